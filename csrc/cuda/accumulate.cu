// CUDA kernel of fasthess::accumulate:  acc[j, off_i : off_i + n_i] += tensors[i][j].
//
// multi_tensor_apply style: a ChunkTable passed by value lists (tensor, chunk) pairs, one per block
// (grid x) for every row of acc (grid y); tensors go in one launch unless the table overflows or the
// source dtype changes.  Blocks write disjoint slices of acc, so no atomics are needed.
#include "../accumulate_plan.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
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
  uint8_t tensor[kTableBlocks];   // table entry of block x
  int32_t chunk[kTableBlocks];    // chunk index of block x within its tensor row
};

template <class A, class S>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(ChunkTable table, A* acc, int64_t cols) {
  const int t = table.tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.chunk[blockIdx.x]) * kChunk;
  const int64_t len = min(kChunk, table.numel[t] - start);
  const int64_t row = blockIdx.y;
  const S* src = static_cast<const S*>(table.src[t]) + row * table.numel[t] + start;
  A* dst = acc + row * cols + table.offset[t] + start;
  for (int64_t base = threadIdx.x; base < len; base += kThreads * kUnroll) {
    S sv[kUnroll];
    A av[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < len) {
        sv[u] = src[k];
        av[u] = dst[k];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = base + u * kThreads;
      if (k < len) dst[k] = av[u] + static_cast<A>(sv[u]);
    }
  }
}

void accumulate_cuda(at::Tensor acc, at::TensorList tensors) {
  const AccumulatePlan plan = plan_accumulate(acc, tensors);
  const c10::cuda::CUDAGuard guard(acc.device());
  TORCH_CHECK(plan.rows <= 65535, "accumulate: at most 65535 rows on CUDA, got ", plan.rows,
              "; split acc into row blocks");
  if (plan.rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(acc.scalar_type(), "acc", [&](auto acc_tag) {
    using A = decltype(acc_tag);
    A* acc_ptr = acc.data_ptr<A>();
    ChunkTable table{};
    int entries = 0, blocks = 0;
    c10::ScalarType table_dtype = c10::ScalarType::Float;
    auto launch = [&] {
      if (blocks == 0) return;
      dispatch_float(table_dtype, "tensors", [&](auto src_tag) {
        using S = decltype(src_tag);
        const dim3 grid(blocks, plan.rows);
        accumulate_kernel<A, S><<<grid, kThreads, 0, stream>>>(table, acc_ptr, plan.cols);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) {
  m.impl("accumulate", &accumulate_cuda);
}

}  // namespace fasthess
