// Implicit QL iteration with Wilkinson shifts for symmetric tridiagonal matrices, written so that the
// CPU kernel (one matrix per task) and the CUDA kernel (one thread block per matrix) share it:
//   ql_sweep         one shifted QL sweep on d, e; records its Givens rotations in c, s;
//   rotate_first_row applies a sweep's rotations to the first row z of the eigenvector matrix Z
//                    (T = Z diag(d) Z^T), all that Gauss quadrature (SLQ) needs: O(m) per sweep, not O(m^2);
//   sorted_rank      position of an eigenvalue in the ascending order.
#pragma once

#include "common.h"

#include <float.h>
#include <math.h>

#include <ATen/core/Tensor.h>

namespace fasthess {

constexpr int kMaxSweepsPerEigenvalue = 60;

// sqrt(a^2 + b^2), without hypot's cost unless squaring could overflow or underflow.
FASTHESS_HD inline double norm2(double a, double b) {
  const double big = fmax(fabs(a), fabs(b));
  return big > 1e-150 && big < 1e150 ? sqrt(a * a + b * b) : hypot(a, b);
}

// One implicit QL sweep on the unreduced block starting at the first unconverged index l.
// d[0..m), e[0..m) with e[i] coupling i and i+1 and e[m-1] == 0.  On return true, rotation i acts on
// (i, i+1) with cosine c[i] and sine s[i], for i = hi-1 down to lo.  Returns false when every
// eigenvalue has converged (or, after kMaxSweepsPerEigenvalue sweeps, is marked NaN).
FASTHESS_HD inline bool ql_sweep(double* d, double* e, int m, int& l, int& sweeps, double* c, double* s,
                                 int& lo, int& hi) {
  while (l < m) {
    int top = l;  // end of the unreduced block: first negligible e[top]
    while (top < m - 1 && fabs(e[top]) > DBL_EPSILON * (fabs(d[top]) + fabs(d[top + 1]))) ++top;
    if (top == l) {
      ++l;
      sweeps = 0;
      continue;
    }
    if (++sweeps > kMaxSweepsPerEigenvalue) {  // no convergence: flag it, deflate, go on
      d[l] = NAN;
      e[l] = 0.0;
      continue;
    }
    // Wilkinson shift: eigenvalue of the leading 2x2 block closer to d[l].
    double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
    double r = norm2(g, 1.0);
    g = d[top] - d[l] + e[l] / (g + copysign(r, g));
    double sn = 1.0, cs = 1.0, p = 0.0;
    hi = lo = top;
    for (int i = top - 1; i >= l; --i) {  // chase the bulge from the bottom of the block up to l
      const double f = sn * e[i];
      const double bb = cs * e[i];
      r = norm2(f, g);
      e[i + 1] = r;
      if (r == 0.0) {  // underflow: the block splits at i+1; retry with the smaller block
        d[i + 1] -= p;
        e[top] = 0.0;
        return true;
      }
      const double inv = 1.0 / r;
      sn = f * inv;
      cs = g * inv;
      g = d[i + 1] - p;
      r = (d[i] - g) * sn + 2.0 * cs * bb;
      p = sn * r;
      d[i + 1] = g + p;
      g = cs * r - bb;
      c[i] = cs;
      s[i] = sn;
      lo = i;
    }
    d[l] -= p;
    e[l] = g;
    e[top] = 0.0;
    return true;
  }
  return false;
}

// z <- z G_{hi-1} ... G_{lo} for the first row z of Z; z[k+1] is final after rotation k, so each step
// loads one entry and stores one.
FASTHESS_HD inline void rotate_first_row(double* z, int lo, int hi, const double* c, const double* s) {
  if (lo >= hi) return;
  double carry = z[hi];
  for (int i = hi - 1; i >= lo; --i) {
    const double v = z[i];
    z[i + 1] = s[i] * v + c[i] * carry;
    carry = c[i] * v - s[i] * carry;
  }
  z[lo] = carry;
}

// Rank of d[k] in ascending order (NaN last, ties by index): a permutation of 0..m-1.
FASTHESS_HD inline int sorted_rank(const double* d, int m, int k) {
  const double x = d[k];
  int rank = 0;
  for (int j = 0; j < m; ++j) {
    const double y = d[j];
    const bool less = isnan(x) ? !isnan(y) : y < x;
    rank += less || ((y == x || (isnan(x) && isnan(y))) && j < k);
  }
  return rank;
}

// Checks d (B, m) and e (B, m-1).
inline void check_tridiag(const at::Tensor& d, const at::Tensor& e) {
  TORCH_CHECK(d.dim() == 2 && d.size(1) >= 1, "tridiag_eigh: d must have shape (B, m) with m >= 1, got ",
              d.sizes());
  TORCH_CHECK(e.dim() == 2 && e.size(0) == d.size(0) && e.size(1) == d.size(1) - 1,
              "tridiag_eigh: e must have shape (B, m-1) = (", d.size(0), ", ", d.size(1) - 1, "), got ", e.sizes());
  TORCH_CHECK(d.scalar_type() == e.scalar_type() && d.device() == e.device(),
              "tridiag_eigh: d and e must share dtype and device, got ", d.scalar_type(), "/", e.scalar_type(),
              " on ", d.device(), "/", e.device());
  TORCH_CHECK(d.size(1) < (int64_t{1} << 30), "tridiag_eigh: m too large");
}

}  // namespace fasthess
