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

constexpr int kLanes = 8;  // rows of Z rotated together (one cache line of doubles)

// Z <- Z G_{hi-1} ... G_{lo} on rows 0 .. rows-1 of Z.
void rotate_rows(double* W, int64_t ldw, int64_t rows, int lo, int hi, const double* c, const double* s) {
  int64_t r = 0;
  for (; r + kLanes <= rows; r += kLanes) apply_rotations<kLanes>(W, ldw, r, lo, hi, c, s);
  for (; r < rows; ++r) apply_rotations<1>(W, ldw, r, lo, hi, c, s);
}

template <class T>
void solve(const T* d_in, const T* e_in, int m, Vectors mode, T* vals, T* vecs, std::vector<double>& work) {
  const int64_t rows = mode == Vectors::kFull ? m : mode == Vectors::kFirst ? 1 : 0;
  const int64_t ldw = mode == Vectors::kFull ? m : 1;
  work.assign(4 * static_cast<size_t>(m) + static_cast<size_t>(m) * rows, 0.0);
  double *d = work.data(), *e = d + m, *c = e + m, *s = c + m, *W = s + m;
  for (int i = 0; i < m; ++i) d[i] = d_in[i];
  for (int i = 0; i + 1 < m; ++i) e[i] = e_in[i];
  for (int64_t r = 0; r < rows; ++r) W[r * ldw + r] = 1.0;
  int l = 0, sweeps = 0, lo = 0, hi = 0;
  while (ql_sweep(d, e, m, l, sweeps, c, s, lo, hi)) rotate_rows(W, ldw, rows, lo, hi, c, s);
  for (int k = 0; k < m; ++k) {
    const int at = sorted_rank(d, m, k);
    vals[at] = static_cast<T>(d[k]);
    for (int64_t r = 0; r < rows; ++r) vecs[r * m + at] = static_cast<T>(W[k * ldw + r]);
  }
}

std::tuple<at::Tensor, at::Tensor> tridiag_eigh_cpu(const at::Tensor& d_arg, const at::Tensor& e_arg,
                                                    int64_t vectors) {
  const Vectors mode = check_tridiag(d_arg, e_arg, vectors);
  const at::Tensor d = d_arg.contiguous(), e = e_arg.contiguous();
  const int64_t batch = d.size(0), m = d.size(1);
  at::Tensor vals = at::empty({batch, m}, d.options());
  at::Tensor vecs = at::empty(vectors_shape(batch, m, mode), d.options());
  const int64_t per_matrix = mode == Vectors::kFull ? m * m * m : 32 * m * m;  // rough flop count
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / per_matrix);
  const int64_t vec_stride = vecs.numel() / std::max<int64_t>(batch, 1);
  dispatch_float(d.scalar_type(), "d", [&](auto tag) {
    using T = decltype(tag);
    const T *dp = d.const_data_ptr<T>(), *ep = e.const_data_ptr<T>();
    T *vp = vals.data_ptr<T>(), *zp = vecs.data_ptr<T>();
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<double> work;
      for (int64_t b = begin; b < end; ++b)
        solve<T>(dp + b * m, ep + b * (m - 1), static_cast<int>(m), mode, vp + b * m, zp + b * vec_stride, work);
    });
  });
  return {vals, vecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fasthess, CPU, m) {
  m.impl("tridiag_eigh", &tridiag_eigh_cpu);
}

}  // namespace fasthess
