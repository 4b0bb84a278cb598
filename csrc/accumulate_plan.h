// Argument checks and flat layout of fasthess::accumulate, shared by its CPU and CUDA kernels.
#pragma once

#include "common.h"

#include <c10/util/accumulate.h>

#include <vector>

namespace fasthess {

// Where each tensor's rows land in the rows of acc: acc[j, offset[i] : offset[i] + numel[i]].
struct AccumulatePlan {
  int64_t rows = 0;                   // b
  int64_t cols = 0;                   // n
  std::vector<at::Tensor> tensors;    // contiguous copies (views when already contiguous)
  std::vector<int64_t> offset;        // column offset of tensor i in acc
  std::vector<int64_t> numel;         // per-row numel of tensor i
};

// Checks acc (b, n) and tensors[i] (b, ...) with per-row numels summing to n; builds the plan.
inline AccumulatePlan plan_accumulate(const at::Tensor& acc, at::TensorList tensors) {
  TORCH_CHECK(acc.dim() == 2, "accumulate: acc must have shape (b, n), got ", acc.sizes());
  TORCH_CHECK(acc.scalar_type() == at::kFloat || acc.scalar_type() == at::kDouble,
              "accumulate: acc must be float32 or float64, got ", acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "accumulate: acc is updated in place and must be contiguous; "
              "pass acc.contiguous() and copy the result back");
  AccumulatePlan plan;
  plan.rows = acc.size(0);
  plan.cols = acc.size(1);
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == acc.device(), "accumulate: tensors[", i, "] is on ", t.device(),
                " but acc is on ", acc.device(), "; move it with .to(acc.device)");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "accumulate: tensors[", i, "] must be float32 or float64, got ", t.scalar_type());
    TORCH_CHECK(t.dim() >= 1 && t.size(0) == plan.rows, "accumulate: tensors[", i, "] has shape ",
                t.sizes(), " but must have acc's ", plan.rows, " rows along dim 0");
    plan.tensors.push_back(t.contiguous());
    plan.offset.push_back(total);
    plan.numel.push_back(c10::multiply_integers(t.sizes().slice(1)));
    total += plan.numel.back();
  }
  TORCH_CHECK(tensors.empty() || total == plan.cols, "accumulate: the tensors hold ", total,
              " elements per row but acc has ", plan.cols, " columns; pass every parameter's tensor, "
              "in flat-layout order");
  return plan;
}

}  // namespace fasthess
