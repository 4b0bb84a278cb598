// Operator schemas of fasthess and the Python module stub that loads them.
//
// `import fasthess._C` runs the static registrations below and in csrc/cpu/*.cpp
// (and csrc/cuda/*.cu when built with CUDA); the ops are then reachable as
// torch.ops.fasthess.<name>.  The module itself exports nothing.  Semantics: fasthess/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fasthess, m) {
  // acc (b, n) += alpha * concat_i tensors[i].reshape(b, -1); returns the float64 (b,) dots of
  // that contribution with other's rows (zeros without other).
  m.def("accumulate_dot(Tensor(a!) acc, Tensor[] tensors, float alpha, Tensor? other=None) -> Tensor");
  // Eigen-decomposition of B symmetric tridiagonal m x m matrices (diagonal d (B, m), off-diagonal
  // e (B, m-1)): eigenvalues (B, m) ascending, and by `vectors`: 0 -> (B, 0) empty,
  // 1 -> first components (B, m) (row 0 of the eigenvector matrix), 2 -> eigenvectors (B, m, m) as columns.
  m.def("tridiag_eigh(Tensor d, Tensor e, int vectors) -> (Tensor, Tensor)");
}
