// CUDA kernel of fasthess::accumulate_dot:  acc[j, off_i : off_i + n_i] += alpha * tensors[i][j],
// dots[j] = sum_i alpha * <tensors[i][j], other[j, off_i : off_i + n_i]>.
//
// multi_tensor_apply style: a ChunkTable passed by value lists (tensor, chunk) pairs, one per block
// (grid x) for every row of acc (grid y); tensors go in one launch unless the table overflows or the
// source dtype changes.  Each block writes its partial dot to its own slot; a second kernel sums each
// row's slots in a fixed order, so results are bit-for-bit reproducible (no float atomics).
#include "../accumulate_plan.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace fasthess {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;            // loads in flight per thread
constexpr int64_t kChunk = 4096;      // elements of one tensor row per block
constexpr int kTableTensors = 48;
constexpr int kTableBlocks = 320;     // keeps sizeof(ChunkTable) under the 4 KiB kernel-argument limit

struct ChunkTable {
  const void* src[kTableTensors];
  int64_t numel[kTableTensors];   // per-row numel
  int64_t offset[kTableTensors];  // column offset in acc
  int64_t first_slot;             // partial-sum slot of this launch's block 0
  uint8_t tensor[kTableBlocks];   // table entry of block x
  int32_t chunk[kTableBlocks];    // chunk index of block x within its tensor row
};

// Sums v over the block in a fixed tree order; the result is valid in thread 0.
__device__ double block_sum(double v) {
  __shared__ double red[kThreads];
  red[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  return red[0];
}

template <class A, class S, bool kDot>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(ChunkTable table, A* acc, const A* other,
                                                              int64_t cols, A alpha, double* partial,
                                                              int64_t slots) {
  const int t = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(kChunk, table.numel[t] - start);
  const int64_t row = blockIdx.y;
  const S* src = static_cast<const S*>(table.src[t]) + row * table.numel[t] + start;
  const int64_t col = row * cols + table.offset[t] + start;
  double dot = 0.0;
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kUnroll) {
    S sv[kUnroll];
    A av[kUnroll], ov[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < len) {
        sv[u] = src[k];
        av[u] = acc[col + k];
        if (kDot) ov[u] = other[col + k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < len) {
        acc[col + k] = av[u] + alpha * static_cast<A>(sv[u]);
        if (kDot) dot += static_cast<double>(sv[u]) * static_cast<double>(ov[u]);
      }
    }
  }
  if constexpr (kDot) {
    const double sum = block_sum(dot);
    if (threadIdx.x == 0) partial[row * slots + table.first_slot + blockIdx.x] = sum;
  }
}

// dots[j] = alpha * sum_k partial[j, k], one block per row.
__global__ void __launch_bounds__(kThreads) reduce_rows(const double* partial, int64_t slots, double alpha,
                                                        double* dots) {
  const int64_t row = blockIdx.x;
  double v = 0.0;
  for (int64_t k = threadIdx.x; k < slots; k += kThreads) v += partial[row * slots + k];
  const double sum = block_sum(v);
  if (threadIdx.x == 0) dots[row] = alpha * sum;
}

at::Tensor accumulate_dot_cuda(at::Tensor acc, at::TensorList tensors, double alpha,
                               const std::optional<at::Tensor>& other) {
  const AccumulatePlan plan = plan_accumulate(acc, tensors, other);
  const c10::cuda::CUDAGuard guard(acc.device());
  TORCH_CHECK(plan.rows <= 65535, "accumulate_dot: at most 65535 rows on CUDA, got ", plan.rows,
              "; split acc into row blocks");
  at::Tensor dots = at::zeros({plan.rows}, acc.options().dtype(at::kDouble));
  int64_t slots = 0;
  for (int64_t n : plan.numel) slots += (n + kChunk - 1) / kChunk;
  if (plan.rows == 0 || slots == 0) return dots;
  const bool with_dot = plan.other.defined();
  at::Tensor partial = with_dot ? at::empty({plan.rows, slots}, dots.options()) : at::Tensor();
  double* partial_ptr = with_dot ? partial.data_ptr<double>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(acc.scalar_type(), "acc", [&](auto acc_tag) {
    using A = decltype(acc_tag);
    A* acc_ptr = acc.data_ptr<A>();
    const A* other_ptr = with_dot ? plan.other.const_data_ptr<A>() : nullptr;
    ChunkTable table{};
    int entries = 0, blocks = 0;
    c10::ScalarType table_dtype = c10::ScalarType::Float;
    auto launch = [&] {
      if (blocks == 0) return;
      dispatch_float(table_dtype, "tensors", [&](auto src_tag) {
        using S = decltype(src_tag);
        const dim3 grid(blocks, plan.rows);
        if (with_dot)
          accumulate_kernel<A, S, true><<<grid, kThreads, 0, stream>>>(table, acc_ptr, other_ptr, plan.cols,
                                                                      static_cast<A>(alpha), partial_ptr, slots);
        else
          accumulate_kernel<A, S, false><<<grid, kThreads, 0, stream>>>(table, acc_ptr, nullptr, plan.cols,
                                                                       static_cast<A>(alpha), nullptr, slots);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      table.first_slot += blocks;
      entries = blocks = 0;
    };
    for (size_t i = 0; i < plan.tensors.size(); ++i) {
      const at::Tensor& t = plan.tensors[i];
      if (plan.numel[i] == 0) continue;
      if (blocks > 0 && t.scalar_type() != table_dtype) launch();
      table_dtype = t.scalar_type();
      bool entered = false;
      for (int64_t chunk = 0; chunk * kChunk < plan.numel[i]; ++chunk) {
        if (blocks == kTableBlocks || (!entered && entries == kTableTensors)) launch();
        if (blocks == 0 || !entered) {
          table.src[entries] = t.const_data_ptr();
          table.numel[entries] = plan.numel[i];
          table.offset[entries] = plan.offset[i];
          ++entries;
          entered = true;
        }
        table.tensor[blocks] = static_cast<uint8_t>(entries - 1);
        table.chunk[blocks] = static_cast<int32_t>(chunk);
        ++blocks;
      }
    }
    launch();
  });
  if (with_dot) {
    reduce_rows<<<plan.rows, kThreads, 0, stream>>>(partial_ptr, slots, alpha, dots.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dots;
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) {
  m.impl("accumulate_dot", &accumulate_dot_cuda);
}

}  // namespace fasthess
