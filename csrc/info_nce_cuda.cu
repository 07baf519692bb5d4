// CUDA launcher of adam::info_nce_fwd (math and outputs: info_nce.cpp; the kernels and the
// reasons for their shapes: info_nce_kernels.cuh, which tests/cuda_emu also compiles for the CPU).
//
// Which partial kernel runs: ADAM_INFO_NCE_CUDA_KERNEL = auto (default) | tc | tiled | simple, read
// at every call. auto takes
//   tc     (TF32 tensor cores) for bf16 inputs, and for float32 inputs when torch allows TF32 in
//          float32 matmuls (torch.backends.cuda.matmul.allow_tf32, or
//          torch.set_float32_matmul_precision("high")), D in {64, 128}, sm_80 or newer;
//   tiled  (fp32 FMA) for the other float32/bf16 inputs with D in {64, 128, 256};
//   simple for the rest (float64, float16, other D, misaligned pointers).
// Forcing tc runs it for float32 even where torch's setting says "highest".
// ADAM_INFO_NCE_CUDA_SMS (below) changes only how the bank is split, never the result's math.
// Only light headers: c10/cuda for the stream and the device guard (ATen/cuda/CUDAContext.h
// pulls cuBLAS headers that a bare toolkit may lack); ATen/Context.h for the TF32 setting.
#include "info_nce.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "info_nce_kernels.cuh"

namespace adam_ext {

using namespace kernels;

namespace {

// "auto", "tc", "tiled" or "simple" (ADAM_INFO_NCE_CUDA_KERNEL), checked so a typo is not ignored.
std::string kernel_choice() {
  const char* v = std::getenv("ADAM_INFO_NCE_CUDA_KERNEL");
  std::string s = v && *v ? v : "auto";
  TORCH_CHECK(s == "auto" || s == "tc" || s == "tiled" || s == "simple",
              "adam::info_nce: ADAM_INFO_NCE_CUDA_KERNEL must be auto, tc, tiled or simple, got '", s, "'");
  return s;
}

// ADAM_INFO_NCE_CUDA_SMS = N plans the bank split as if the GPU had N multiprocessors (unset or 0:
// the real count). With a small N every block walks many bank tiles even on a small bank, which is
// how the tests and the compute-sanitizer run reach the cross-tile rescale and the barriers that
// guard a bank tile without a large input.
int64_t planned_sms(int64_t real) {
  const char* v = std::getenv("ADAM_INFO_NCE_CUDA_SMS");
  if (!v || !*v) return real;
  char* end = nullptr;
  const long long n = std::strtoll(v, &end, 10);
  TORCH_CHECK(end && *end == '\0' && n >= 0, "adam::info_nce: ADAM_INFO_NCE_CUDA_SMS must be a count >= 0, got '", v, "'");
  return n == 0 ? real : n;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature,
    double threshold, bool need_pb) {
  check_inputs(q, k, queue, temperature, threshold);
  TORCH_CHECK(q.is_cuda(), "adam::info_nce: CUDA kernel got q on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), D = q.size(1), K = queue.size(0);
  const auto dt = q.scalar_type();
  const auto acc = acc_dtype(dt);
  auto opts = q.options().dtype(acc);
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor n_pruned = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor pb = at::empty({B, need_pb ? D : 0}, opts);

  int dev = q.get_device(), sms = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  auto stream = c10::cuda::getCurrentCUDAStream(dev);

  // The tiled/tc kernels read rows as float4 (fp32) or 4 x bf16 (8 bytes): pointers must be aligned.
  const int64_t align = dt == at::kFloat ? 16 : 8;
  const bool fast_dtype = (dt == at::kFloat || dt == at::kBFloat16) &&
                          reinterpret_cast<uintptr_t>(q.data_ptr()) % align == 0 &&
                          reinterpret_cast<uintptr_t>(queue.data_ptr()) % align == 0;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  const bool tiled_ok = fast_dtype && tiled::supports(D) && tiled::smem_bytes(D) <= smem_optin;
  const bool tc_ok = fast_dtype && tc::supports(D) && tc::smem_bytes(D) <= smem_optin && major >= 8;
  const std::string choice = kernel_choice();
  TORCH_CHECK(choice != "tiled" || tiled_ok, "adam::info_nce: ADAM_INFO_NCE_CUDA_KERNEL=tiled needs float32 or "
              "bfloat16 inputs with D in {64, 128, 256} and 16-byte aligned q and queue; got ", dtype_str(dt), ", D = ", D);
  TORCH_CHECK(choice != "tc" || tc_ok, "adam::info_nce: ADAM_INFO_NCE_CUDA_KERNEL=tc needs float32 or bfloat16 "
              "inputs with D in {64, 128}, 16-byte aligned q and queue, and an sm_80+ GPU; got ", dtype_str(dt), ", D = ", D);
  const bool tf32_allowed = dt == at::kBFloat16 || at::globalContext().allowTF32CuBLAS();
  Kernel kind = Kernel::SIMPLE;
  if (choice == "tc" || (choice == "auto" && tc_ok && tf32_allowed)) kind = Kernel::TC;
  else if (choice == "tiled" || (choice == "auto" && tiled_ok)) kind = Kernel::TILED;

  const Plan pl = plan(kind, B, D, K, planned_sms(sms));
  TORCH_CHECK(kind != Kernel::SIMPLE || pl.row_tiles <= 65535, "adam::info_nce: B = ", B,
              " anchors is more than the simple kernel's grid allows");
  const int64_t nsplit = pl.nsplit;
  at::Tensor part_m = at::empty({nsplit, B}, opts), part_l = at::empty({nsplit, B}, opts);
  at::Tensor part_cnt = at::empty({nsplit, B}, opts.dtype(at::kLong));
  at::Tensor part_acc = at::empty({need_pb ? nsplit : 0, B, D}, opts);

  if (kind != Kernel::SIMPLE) {
    const dim3 grid(static_cast<unsigned>(pl.row_tiles), static_cast<unsigned>(nsplit));
    const float T = static_cast<float>(temperature), t = static_cast<float>(threshold);
    auto run = [&](auto raw) {  // raw: float, or uint16_t for bf16 bits
      using raw_t = decltype(raw);
      with_fast_kernel<raw_t>(kind, D, [&](auto kern, int threads, int64_t smem) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kern<<<grid, threads, smem, stream>>>(
            reinterpret_cast<const raw_t*>(q.data_ptr()), reinterpret_cast<const raw_t*>(queue.data_ptr()), B, K,
            pl.rows_per_split, T, t, need_pb, part_m.data_ptr<float>(), part_l.data_ptr<float>(),
            part_cnt.data_ptr<int64_t>(), need_pb ? part_acc.data_ptr<float>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    };
    if (dt == at::kFloat) run(float{});
    else run(uint16_t{});
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "adam_info_nce_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (kind == Kernel::SIMPLE) {
      const size_t smem = simple::smem_bytes(D, need_pb, sizeof(acc_t));
      TORCH_CHECK(smem <= size_t(smem_optin), "adam::info_nce: D = ", D, " needs ", smem,
                  " bytes of shared memory per block, the device has ", smem_optin);
      auto kern = info_nce_partial_kernel<scalar_t, acc_t>;
      if (smem > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      const dim3 grid(static_cast<unsigned>(nsplit), static_cast<unsigned>(pl.row_tiles));
      kern<<<grid, simple::NT, smem, stream>>>(
          q.data_ptr<scalar_t>(), queue.data_ptr<scalar_t>(), B, D, K, pl.rows_per_split,
          static_cast<acc_t>(temperature), static_cast<acc_t>(threshold), need_pb,
          part_m.data_ptr<acc_t>(), part_l.data_ptr<acc_t>(), part_cnt.data_ptr<int64_t>(),
          need_pb ? part_acc.data_ptr<acc_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    info_nce_combine_kernel<scalar_t, acc_t><<<unsigned(B), CT, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), B, D, nsplit,
        static_cast<acc_t>(temperature), need_pb, part_m.data_ptr<acc_t>(),
        part_l.data_ptr<acc_t>(), part_cnt.data_ptr<int64_t>(),
        need_pb ? part_acc.data_ptr<acc_t>() : nullptr, loss.data_ptr<acc_t>(),
        lse.data_ptr<acc_t>(), n_pruned.data_ptr<int64_t>(),
        need_pb ? pb.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, n_pruned, pb};
}

TORCH_LIBRARY_IMPL(adam, CUDA, m) { m.impl("info_nce_fwd", &info_nce_fwd_cuda); }

}  // namespace adam_ext
