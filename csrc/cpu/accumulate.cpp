// CPU kernel of fasthess::accumulate:  acc[j, off_i : off_i + n_i] += tensors[i][j].
//
// Work items are (tensor, row, chunk) triples over disjoint slices of acc, spread over threads.
#include "../accumulate_plan.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace fasthess {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item

struct Item {
  int64_t tensor, row, start, len;
};

void accumulate_cpu(at::Tensor acc, at::TensorList tensors) {
  const AccumulatePlan plan = plan_accumulate(acc, tensors);
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(plan.tensors.size()); ++i)
    for (int64_t j = 0; j < plan.rows; ++j)
      for (int64_t s = 0; s < plan.numel[i]; s += kChunk)
        items.push_back({i, j, s, std::min(kChunk, plan.numel[i] - s)});
  dispatch_float(acc.scalar_type(), "acc", [&](auto acc_tag) {
    using A = decltype(acc_tag);
    A* acc_ptr = acc.data_ptr<A>();
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t w = begin; w < end; ++w) {
        const Item& it = items[w];
        A* dst = acc_ptr + it.row * plan.cols + plan.offset[it.tensor] + it.start;
        const at::Tensor& t = plan.tensors[it.tensor];
        dispatch_float(t.scalar_type(), "tensors", [&](auto src_tag) {
          using S = decltype(src_tag);
          const S* src = t.const_data_ptr<S>() + it.row * plan.numel[it.tensor] + it.start;
          for (int64_t k = 0; k < it.len; ++k) dst[k] += static_cast<A>(src[k]);
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CPU, m) {
  m.impl("accumulate", &accumulate_cpu);
}

}  // namespace fasthess
