// Shared declarations of the fused pruned-InfoNCE op (see info_nce.cpp for the math, docs/METHOD.md §4).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cmath>
#include <string>
#include <tuple>

namespace adam_ext {

// "(4, 64)". Messages format shapes and dtypes as plain strings instead of streaming IntArrayRef or
// ScalarType into TORCH_CHECK: built against torch 2.11 on a GPU machine, the streamed shape crashed
// the process (SIGSEGV) where it should have raised (BENCHMARKS.md, "GPU check").
inline std::string shape_str(const at::Tensor& x) {
  std::string s = "(";
  for (int64_t i = 0; i < x.dim(); ++i) s += (i ? ", " : "") + std::to_string(x.size(i));
  return s + ")";
}
inline const char* dtype_str(at::ScalarType dt) { return c10::toString(dt); }

// Input checks shared by the CPU and CUDA kernels. Messages name the argument so a caller
// passing e.g. a (K, D) bank with the wrong D sees which tensor is off.
inline void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue,
                         double temperature, double threshold) {
  TORCH_CHECK(q.dim() == 2, "adam::info_nce: q must be 2-D (B, D), got shape ", shape_str(q));
  TORCH_CHECK(k.sizes() == q.sizes(), "adam::info_nce: k must have the shape of q ", shape_str(q),
              ", got ", shape_str(k));
  TORCH_CHECK(queue.dim() == 2 && queue.size(1) == q.size(1),
              "adam::info_nce: queue (the bank) must be 2-D (K, D) with D = q.size(1) = ", q.size(1),
              ", got shape ", shape_str(queue));
  TORCH_CHECK(q.size(0) >= 1, "adam::info_nce: q must hold at least one anchor (B >= 1)");
  TORCH_CHECK(queue.size(0) >= 1, "adam::info_nce: queue must hold at least one entry (K >= 1)");
  TORCH_CHECK(q.size(1) >= 1, "adam::info_nce: the embedding dimension D must be >= 1");
  auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "adam::info_nce: q must be float32, float64, bfloat16 or float16, got ", dtype_str(dt));
  TORCH_CHECK(k.scalar_type() == dt, "adam::info_nce: k dtype ", dtype_str(k.scalar_type()),
              " differs from q dtype ", dtype_str(dt));
  TORCH_CHECK(queue.scalar_type() == dt, "adam::info_nce: queue dtype ", dtype_str(queue.scalar_type()),
              " differs from q dtype ", dtype_str(dt));
  TORCH_CHECK(k.device() == q.device(), "adam::info_nce: k is on ", k.device(), " but q is on ",
              q.device());
  TORCH_CHECK(queue.device() == q.device(), "adam::info_nce: queue is on ", queue.device(),
              " but q is on ", q.device());
  TORCH_CHECK(q.is_contiguous(), "adam::info_nce: q must be contiguous (call .contiguous())");
  TORCH_CHECK(k.is_contiguous(), "adam::info_nce: k must be contiguous (call .contiguous())");
  TORCH_CHECK(queue.is_contiguous(), "adam::info_nce: queue must be contiguous");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0,
              "adam::info_nce: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK(!std::isnan(threshold),
              "adam::info_nce: threshold is NaN (pass +inf, or None from Python, for no pruning)");
}

// Accumulation dtype: float64 stays float64, everything else accumulates in float32.
inline at::ScalarType acc_dtype(at::ScalarType dt) {
  return dt == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace adam_ext
