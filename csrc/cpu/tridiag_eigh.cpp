// CPU kernel of fasthess::tridiag_eigh: implicit QL (csrc/tridiag_ql.h) in float64, matrices
// distributed over threads with at::parallel_for.
#include "../tridiag_ql.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fasthess {
namespace {

// Eigenvalues vals (ascending) and first eigenvector components first of one m x m matrix.
template <class T>
void solve(const T* d_in, const T* e_in, int m, T* vals, T* first, std::vector<double>& work) {
  work.assign(5 * static_cast<size_t>(m), 0.0);
  double *d = work.data(), *e = d + m, *c = e + m, *s = c + m, *z = s + m;
  for (int i = 0; i < m; ++i) d[i] = d_in[i];
  for (int i = 0; i + 1 < m; ++i) e[i] = e_in[i];
  z[0] = 1.0;  // first row of Z = I
  int l = 0, sweeps = 0, lo = 0, hi = 0;
  while (ql_sweep(d, e, m, l, sweeps, c, s, lo, hi)) rotate_first_row(z, lo, hi, c, s);
  for (int k = 0; k < m; ++k) {
    const int at = sorted_rank(d, m, k);
    vals[at] = static_cast<T>(d[k]);
    first[at] = static_cast<T>(z[k]);
  }
}

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cpu(const at::Tensor& d_arg, const at::Tensor& e_arg) {
  check_tridiag(d_arg, e_arg);
  const at::Tensor d = d_arg.contiguous(), e = e_arg.contiguous();
  const int64_t batch = d.size(0), m = d.size(1);
  at::Tensor vals = at::empty({batch, m}, d.options());
  at::Tensor first = at::empty({batch, m}, d.options());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (32 * m * m));  // ~32 m^2 flops per matrix
  dispatch_float(d.scalar_type(), "d", [&](auto tag) {
    using T = decltype(tag);
    const T *dp = d.const_data_ptr<T>(), *ep = e.const_data_ptr<T>();
    T *vp = vals.data_ptr<T>(), *fp = first.data_ptr<T>();
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> work;
      for (int64_t b = begin; b < end; ++b)
        solve<T>(dp + b * m, ep + b * (m - 1), static_cast<int>(m), vp + b * m, fp + b * m, work);
    });
  });
  return {vals, first};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CPU, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cpu);
}

}  // namespace fasthess
