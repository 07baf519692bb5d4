// Fused purposive pruning + masked InfoNCE (docs/METHOD.md §4), CPU kernel and op registration.
//
// This is the FAST path. The readable reference is `info_nce` in adam.py (a dozen lines of
// PyTorch that build the B x K score matrix); every kernel here and in info_nce_kernels.cuh is
// tested against it (tests/test_fused_op.py, tests/test_cuda_emulated.py) and checked again on
// each device at the start of training (adam_ext/selfcheck.py). Read that one to learn the method.
//
// For anchor i with query q_i, positive key k_i and bank rows b_j (queue, K x D):
//   x0_i  = q_i.k_i / T                       positive logit, always kept
//   s_ij  = q_i.b_j                           cosine to bank entry j
//   keep j unless s_ij >= t                   (t = +inf: no pruning, every entry kept). A NaN score is kept and
//                                             makes the loss NaN, a kept +inf score makes it +inf, as in
//                                             adam.info_nce (the rules of online_lse.h)
//   lse_i = log( exp(x0_i) + sum_{kept j} exp(s_ij / T) )
//   L_i   = lse_i - x0_i
// and, for the backward (docs/METHOD.md §4, "Gradients"), the attention-like output
//   pb_i  = sum_{kept j} p_ij b_j,  p_ij = exp(s_ij / T - lse_i).
// Then dL_i/dq_i = ((p_i0 - 1) k_i + pb_i) / T and dL_i/dk_i = (p_i0 - 1) q_i / T with
// p_i0 = exp(x0_i - lse_i) = exp(-L_i): the backward (adam_ext/ops.py) is O(B x D) and never
// reads the bank again.
//
// Op adam::info_nce_fwd(q, k, queue, T, t, need_pb) -> (loss B, lse B, n_pruned B (int64), pb B x D')
// with D' = D if need_pb else 0; loss/lse/pb are float64 for float64 inputs and float32 otherwise.
//
// CPU strategy (split-K, as the CUDA kernel): the bank is cut into `nsplit` contiguous ranges
// (8 per thread, claimed dynamically inside one at::parallel_for); each range is walked in chunks
// of Kc rows. A chunk's B x Kc score
// tile comes from one GEMM (at::mm, single-threaded inside the parallel region), is masked and
// folded into a running (max m, sum l, weighted sum acc) per anchor (online log-sum-exp), and
// acc += P @ chunk is a second GEMM. Partial states of the splits are merged at the end as
// split-KV flash-decoding does. Extra memory: threads x B x Kc (score tiles) + nsplit x B x (D + 2)
// (partial states), never B x K.
#include "info_nce.h"
#include "online_lse.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <string>
#include <vector>

namespace adam_ext {

namespace {

template <typename acc_t>
void fwd_cpu_impl(const at::Tensor& qa, const at::Tensor& queue, const at::Tensor& x0, double T,
                  double t, bool need_pb, at::Tensor& loss, at::Tensor& lse, at::Tensor& n_pruned,
                  at::Tensor& pb) {
  const int64_t B = qa.size(0), D = qa.size(1), K = queue.size(0);
  const auto acc = qa.scalar_type();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t Ta = static_cast<acc_t>(T);
  const acc_t ta = static_cast<acc_t>(t);  // +inf stays +inf
  // B x Kc score tile of about 1 MiB (float32) so that it stays in L2 between the passes.
  const int64_t Kc = std::clamp<int64_t>((int64_t(1) << 18) / B, 64, 4096);
  const int64_t nchunks = (K + Kc - 1) / Kc;
  const int64_t nthreads = at::get_num_threads();
  const int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>(8 * nthreads, nchunks));

  at::Tensor part_m = at::full({nsplit, B}, ninf, qa.options());       // running max per anchor
  at::Tensor part_l = at::zeros({nsplit, B}, qa.options());            // running sum of exp
  at::Tensor part_acc = at::zeros({nsplit, B, need_pb ? D : 0}, qa.options());  // sum p b
  at::Tensor part_cnt = at::zeros({nsplit, B}, qa.options().dtype(at::kLong));

  // Each thread takes the next unclaimed split until none is left (dynamic scheduling): on a
  // shared machine a descheduled thread then holds up at most one split, not half the bank.
  std::atomic<int64_t> next_split{0};
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> scale(B);
    at::Tensor S_buf = at::empty({B * Kc}, qa.options());  // this thread's score tile, reused
    at::Tensor rs = at::empty({B}, qa.options());
    for (int64_t s; (s = next_split.fetch_add(1)) < nsplit;) {
      acc_t* m = part_m.data_ptr<acc_t>() + s * B;
      acc_t* l = part_l.data_ptr<acc_t>() + s * B;
      int64_t* cnt = part_cnt.data_ptr<int64_t>() + s * B;
      at::Tensor acc_s = part_acc.select(0, s);  // B x D
      for (int64_t c = s * nchunks / nsplit; c < (s + 1) * nchunks / nsplit; ++c) {
        const int64_t j0 = c * Kc, n = std::min(Kc, K - j0);
        at::Tensor bank = queue.narrow(0, j0, n).to(acc).contiguous();  // n x D (a copy only for bf16/fp16)
        at::Tensor S = S_buf.narrow(0, 0, B * n).view({B, n});
        at::mm_out(S, qa, bank.t());                                   // B x n cosines s_ij
        acc_t* Sp = S.data_ptr<acc_t>();
        for (int64_t i = 0; i < B; ++i) {
          acc_t* row = Sp + i * n;
          acc_t mt = ninf;
          int64_t pruned = 0;
          for (int64_t j = 0; j < n; ++j) {  // mask (keep unless s >= t; NaN kept) and scale by 1/T
            const acc_t sij = row[j];
            if (!lse::pruned(sij, ta)) {
              const acc_t x = sij / Ta;
              row[j] = x;
              mt = std::max(mt, x);
            } else {
              row[j] = ninf;
              ++pruned;
            }
          }
          cnt[i] += pruned;
          const acc_t m_new = std::max(m[i], mt);
          const acc_t sub = lse::shift(m_new);  // 0 where m_new is +-inf: no inf - inf
          for (int64_t j = 0; j < n; ++j) row[j] -= sub;
          scale[i] = lse::rescale(m[i], m_new);
          m[i] = m_new;
        }
        S.exp_();  // P tile: exp(x - m_new); ATen's vectorised exp
        at::sum_out(rs, S, 1);
        const acc_t* rsp = rs.data_ptr<acc_t>();
        for (int64_t i = 0; i < B; ++i) l[i] = l[i] * scale[i] + rsp[i];
        if (need_pb) {
          acc_s.mul_(at::from_blob(scale.data(), {B, 1}, qa.options()));
          acc_s.addmm_(S, bank);  // acc += P @ chunk   (B x n @ n x D)
        }
      }
    }
  });

  // Merge the splits' partial states with the positive logit (always kept).
  const acc_t* x0p = x0.data_ptr<acc_t>();
  const acc_t* pm = part_m.data_ptr<acc_t>();
  const acc_t* pl = part_l.data_ptr<acc_t>();
  const int64_t* pc = part_cnt.data_ptr<int64_t>();
  const acc_t* pa = part_acc.data_ptr<acc_t>();
  acc_t* lossp = loss.data_ptr<acc_t>();
  acc_t* lsep = lse.data_ptr<acc_t>();
  int64_t* np = n_pruned.data_ptr<int64_t>();
  acc_t* pbp = need_pb ? pb.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, B, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t M = x0p[i];
      int64_t c = 0;
      for (int64_t s = 0; s < nsplit; ++s) {
        M = std::max(M, pm[s * B + i]);
        c += pc[s * B + i];
      }
      acc_t L = lse::rescale(x0p[i], M);  // M = +inf (a kept +inf score): L and lse are +inf, not NaN
      for (int64_t s = 0; s < nsplit; ++s) L += pl[s * B + i] * lse::rescale(pm[s * B + i], M);
      lsep[i] = M + std::log(L);
      lossp[i] = lsep[i] - x0p[i];
      np[i] = c;
      if (pbp) {
        acc_t* out = pbp + i * D;
        for (int64_t d = 0; d < D; ++d) out[d] = 0;
        for (int64_t s = 0; s < nsplit; ++s) {
          const acc_t w = lse::rescale(pm[s * B + i], M) / L;
          const acc_t* a = pa + (s * B + i) * D;
          for (int64_t d = 0; d < D; ++d) out[d] += w * a[d];
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature,
    double threshold, bool need_pb) {
  check_inputs(q, k, queue, temperature, threshold);
  TORCH_CHECK(q.device().is_cpu(), "adam::info_nce: CPU kernel got q on ", q.device());
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), D = q.size(1);
  at::Tensor qa = q.to(acc).contiguous();
  at::Tensor x0 = (qa * k.to(acc)).sum(1).div_(temperature).contiguous();  // B, positive logits
  auto opts = qa.options();
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor n_pruned = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor pb = at::empty({B, need_pb ? D : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "adam_info_nce_fwd_cpu", [&] {
    fwd_cpu_impl<scalar_t>(qa, queue, x0, temperature, threshold, need_pb, loss, lse, n_pruned, pb);
  });
  return {loss, lse, n_pruned, pb};
}

#define ADAM_STR2(x) #x
#define ADAM_STR(x) ADAM_STR2(x)

// "CPU" or "CPU+CUDA(sm_80_sm_90)"-style token; adam_ext.build_info() makes it readable.
std::string build_info() {
#ifdef ADAM_WITH_CUDA
  return std::string("CPU+CUDA(") + ADAM_STR(ADAM_CUDA_ARCHS) + ")";
#else
  return "CPU";
#endif
}

TORCH_LIBRARY(adam, m) {
  m.def(
      "info_nce_fwd(Tensor q, Tensor k, Tensor queue, float temperature, float threshold, "
      "bool need_pb) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(adam, CPU, m) { m.impl("info_nce_fwd", &info_nce_fwd_cpu); }

}  // namespace adam_ext

// A Python module named adam_ext._C whose only job is to run the registrations above on import
// (pytorch/extension-cpp does the same; no pybind11 needed).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
