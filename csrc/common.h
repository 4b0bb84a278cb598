// Helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels of fasthess.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <utility>

#if defined(__CUDACC__)
#define FASTHESS_HD __host__ __device__
#else
#define FASTHESS_HD
#endif

namespace fasthess {

// Calls f(float{}) or f(double{}) for a float32 / float64 dtype; `what` names the argument in errors.
template <class F>
decltype(auto) dispatch_float(c10::ScalarType t, const char* what, F&& f) {
  if (t == c10::ScalarType::Float) return std::forward<F>(f)(float{});
  TORCH_CHECK(t == c10::ScalarType::Double, what, " must be float32 or float64, got ", t,
              "; convert it with .float() or .double()");
  return std::forward<F>(f)(double{});
}

}  // namespace fasthess
