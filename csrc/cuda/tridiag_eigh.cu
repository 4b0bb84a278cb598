// CUDA kernel of fasthess::tridiag_eigh: one thread block per matrix.  Thread 0 runs the implicit
// QL sweeps (csrc/tridiag_ql.h) on d, e in shared memory; after each sweep all threads apply its
// rotations to the eigenvector work array, one row of Z per thread (coalesced: W[k * m + r]).
#include "../tridiag_ql.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace fasthess {
namespace {

// Dynamic shared memory: d, e, c, s, first row of Z (doubles) and ranks (ints).
int64_t shared_bytes(int64_t m) { return 5 * m * sizeof(double) + m * sizeof(int); }

template <class T>
__global__ void tridiag_kernel(const T* d_in, const T* e_in, int m, Vectors mode, T* vals, T* vecs,
                               double* work) {
  extern __shared__ double shared[];
  double *d = shared, *e = d + m, *c = e + m, *s = c + m, *first = s + m;
  int* rank = reinterpret_cast<int*>(first + m);
  __shared__ int l, sweeps, lo, hi;
  __shared__ bool more;
  const int64_t b = blockIdx.x;
  const bool full = mode == Vectors::kFull;
  const int64_t rows = full ? m : mode == Vectors::kFirst ? 1 : 0;
  const int64_t ldw = full ? m : 1;
  double* W = full ? work + b * m * m : first;
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    d[i] = d_in[b * m + i];
    e[i] = i + 1 < m ? static_cast<double>(e_in[b * (m - 1) + i]) : 0.0;
  }
  for (int64_t idx = threadIdx.x; idx < m * rows; idx += blockDim.x) W[idx] = idx / ldw == idx % ldw ? 1.0 : 0.0;
  if (threadIdx.x == 0) l = sweeps = 0;
  __syncthreads();
  while (true) {
    if (threadIdx.x == 0) more = ql_sweep(d, e, m, l, sweeps, c, s, lo, hi);
    __syncthreads();
    if (!more) break;
    for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) apply_rotations<1>(W, ldw, r, lo, hi, c, s);
    __syncthreads();
  }
  for (int k = threadIdx.x; k < m; k += blockDim.x) rank[k] = sorted_rank(d, m, k);
  __syncthreads();
  for (int k = threadIdx.x; k < m; k += blockDim.x) {
    vals[b * m + rank[k]] = static_cast<T>(d[k]);
    if (mode == Vectors::kFirst) vecs[b * m + rank[k]] = static_cast<T>(first[k]);
  }
  if (full)
    for (int64_t idx = threadIdx.x; idx < int64_t{m} * m; idx += blockDim.x)
      vecs[b * m * m + (idx % m) * m + rank[idx / m]] = static_cast<T>(W[idx]);
}

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cuda(const at::Tensor& d_arg, const at::Tensor& e_arg,
                                                     int64_t vectors) {
  const Vectors mode = check_tridiag(d_arg, e_arg, vectors);
  const c10::cuda::CUDAGuard guard(d_arg.device());
  const at::Tensor d = d_arg.contiguous(), e = e_arg.contiguous();
  const int64_t batch = d.size(0), m = d.size(1);
  at::Tensor vals = at::empty({batch, m}, d.options());
  at::Tensor vecs = at::empty(vectors_shape(batch, m, mode), d.options());
  if (batch == 0) return {vals, vecs};
  TORCH_CHECK(batch < (int64_t{1} << 31), "tridiag_eigh: at most 2^31-1 matrices per call on CUDA");
  const bool full = mode == Vectors::kFull;
  at::Tensor work = full ? at::empty({batch, m, m}, d.options().dtype(at::kDouble)) : at::Tensor();
  const int threads = full ? static_cast<int>(std::min<int64_t>(256, (m + 31) / 32 * 32)) : 32;
  const int64_t smem = shared_bytes(m);
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, d.device().index()));
  TORCH_CHECK(smem <= smem_limit, "tridiag_eigh: m = ", m, " needs ", smem, " bytes of shared memory per block, "
              "the device has ", smem_limit, "; use the CPU kernel for such m");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(d.scalar_type(), "d", [&](auto tag) {
    using T = decltype(tag);
    auto kernel = tridiag_kernel<T>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(batch), threads, smem, stream>>>(
        d.const_data_ptr<T>(), e.const_data_ptr<T>(), static_cast<int>(m), mode, vals.data_ptr<T>(),
        vecs.data_ptr<T>(), full ? work.data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {vals, vecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cuda);
}

}  // namespace fasthess
