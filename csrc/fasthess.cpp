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
  // acc (b, n) += concat_i tensors[i].reshape(b, -1), in place.
  m.def("accumulate(Tensor(a!) acc, Tensor[] tensors) -> ()");
  // Eigenvalues (B, m) ascending of B symmetric tridiagonal m x m matrices (diagonal d (B, m),
  // off-diagonal e (B, m-1)) and the first components (B, m) of their unit eigenvectors.
  m.def("tridiag_eigh(Tensor d, Tensor e) -> (Tensor, Tensor)");
}
