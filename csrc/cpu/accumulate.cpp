// CPU kernel of fasthess::accumulate_dot:  acc[j, off_i : off_i + n_i] += alpha * tensors[i][j],
// dots[j] = sum_i alpha * <tensors[i][j], other[j, off_i : off_i + n_i]>.
//
// Work items are (tensor, row, chunk) triples; each writes one partial dot, and the partials are
// summed per row in item order, so the result does not depend on the thread count.
#include "../accumulate_plan.h"

#include <ATen/Parallel.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

namespace fasthess {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item
constexpr int kLanes = 8;          // independent partial sums inside an item

struct Item {
  int64_t tensor, row, start, len;
};

// acc[k] += a * src[k] for k < len; returns sum_k src[k] * other[k] in float64 (0 without other).
template <class A, class S>
double axpy_dot(A* acc, const S* src, const A* other, A a, int64_t len) {
  if (other == nullptr) {
    for (int64_t k = 0; k < len; ++k) acc[k] += a * static_cast<A>(src[k]);
    return 0.0;
  }
  double lane[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      acc[k + l] += a * static_cast<A>(src[k + l]);
      lane[l] += static_cast<double>(src[k + l]) * static_cast<double>(other[k + l]);
    }
  }
  for (; k < len; ++k) {
    acc[k] += a * static_cast<A>(src[k]);
    lane[0] += static_cast<double>(src[k]) * static_cast<double>(other[k]);
  }
  double sum = 0.0;
  for (double v : lane) sum += v;
  return sum;
}

at::Tensor accumulate_dot_cpu(at::Tensor acc, at::TensorList tensors, double alpha,
                              const std::optional<at::Tensor>& other) {
  const AccumulatePlan plan = plan_accumulate(acc, tensors, other);
  at::Tensor dots = at::zeros({plan.rows}, acc.options().dtype(at::kDouble));
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(plan.tensors.size()); ++i)
    for (int64_t j = 0; j < plan.rows; ++j)
      for (int64_t s = 0; s < plan.numel[i]; s += kChunk)
        items.push_back({i, j, s, std::min(kChunk, plan.numel[i] - s)});
  std::vector<double> partial(items.size(), 0.0);
  dispatch_float(acc.scalar_type(), "acc", [&](auto acc_tag) {
    using A = decltype(acc_tag);
    A* acc_ptr = acc.data_ptr<A>();
    const A* other_ptr = plan.other.defined() ? plan.other.const_data_ptr<A>() : nullptr;
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Item& it = items[w];
        const int64_t col = it.row * plan.cols + plan.offset[it.tensor] + it.start;
        const at::Tensor& t = plan.tensors[it.tensor];
        partial[w] = dispatch_float(t.scalar_type(), "tensors", [&](auto src_tag) {
          using S = decltype(src_tag);
          const S* src = t.const_data_ptr<S>() + it.row * plan.numel[it.tensor] + it.start;
          return axpy_dot<A, S>(acc_ptr + col, src, other_ptr ? other_ptr + col : nullptr,
                                static_cast<A>(alpha), it.len);
        });
      }
    });
  });
  double* out = dots.data_ptr<double>();
  for (size_t w = 0; w < items.size(); ++w) out[items[w].row] += partial[w];
  for (int64_t j = 0; j < plan.rows; ++j) out[j] *= alpha;
  return dots;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CPU, m) {
  m.impl("accumulate_dot", &accumulate_dot_cpu);
}

}  // namespace fasthess
