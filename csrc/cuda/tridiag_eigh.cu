// CUDA kernel of fasthess::tridiag_eigh: one thread block per matrix.  Thread 0 runs the implicit
// QL sweeps (csrc/tridiag_ql.h) on d, e in shared memory and rotates the first row z of Z after
// each; the block then ranks the eigenvalues and writes both outputs in ascending order.
#include "../tridiag_ql.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

namespace fasthess {
namespace {

constexpr int kThreads = 32;

// Dynamic shared memory: d, e, c, s, first row of Z (doubles) and ranks (ints).
int64_t shared_bytes(int64_t m) { return 5 * m * sizeof(double) + m * sizeof(int); }

template <class T>
__global__ void tridiag_kernel(const T* d_in, const T* e_in, int m, T* vals, T* first) {
  extern __shared__ double shared[];
  double *d = shared, *e = d + m, *c = e + m, *s = c + m, *z = s + m;
  int* rank = reinterpret_cast<int*>(z + m);
  const int64_t b = blockIdx.x;
  for (int i = threadIdx.x; i < m; i += blockDim.x) {
    d[i] = d_in[b * m + i];
    e[i] = i + 1 < m ? static_cast<double>(e_in[b * (m - 1) + i]) : 0.0;
    z[i] = i == 0 ? 1.0 : 0.0;  // first row of Z = I
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int l = 0, sweeps = 0, lo = 0, hi = 0;
    while (ql_sweep(d, e, m, l, sweeps, c, s, lo, hi)) rotate_first_row(z, lo, hi, c, s);
  }
  __syncthreads();
  for (int k = threadIdx.x; k < m; k += blockDim.x) rank[k] = sorted_rank(d, m, k);
  __syncthreads();
  for (int k = threadIdx.x; k < m; k += blockDim.x) {
    vals[b * m + rank[k]] = static_cast<T>(d[k]);
    first[b * m + rank[k]] = static_cast<T>(z[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cuda(const at::Tensor& d_arg, const at::Tensor& e_arg) {
  check_tridiag(d_arg, e_arg);
  const c10::cuda::CUDAGuard guard(d_arg.device());
  const at::Tensor d = d_arg.contiguous(), e = e_arg.contiguous();
  const int64_t batch = d.size(0), m = d.size(1);
  at::Tensor vals = at::empty({batch, m}, d.options());
  at::Tensor first = at::empty({batch, m}, d.options());
  if (batch == 0) return {vals, first};
  TORCH_CHECK(batch < (int64_t{1} << 31), "tridiag_eigh: at most 2^31-1 matrices per call on CUDA");
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
    kernel<<<static_cast<unsigned>(batch), kThreads, smem, stream>>>(
        d.const_data_ptr<T>(), e.const_data_ptr<T>(), static_cast<int>(m), vals.data_ptr<T>(), first.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {vals, first};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CUDA, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cuda);
}

}  // namespace fasthess
