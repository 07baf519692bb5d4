// CUDA kernel of adam::info_nce_fwd (math and outputs: see info_nce.cpp).
//
// Split-K over the bank, as split-KV flash-decoding: B is small (a batch of anchors) and K is
// large, so the bank is cut into `nsplit` ranges and each block (one anchor tile of BM rows x one
// bank range) walks its range in tiles of BN rows, keeping for each anchor the online
// log-sum-exp state (running max m, running sum l) and the running sum acc = sum_j exp(x_ij - m) b_j
// in shared memory. A second kernel merges the nsplit partial states per anchor with the positive
// logit. Extra memory: nsplit x B x (D + 3) partials with nsplit ~ 4 x SMs / ceil(B / BM), i.e.
// O(SMs x BM x D), independent of K; never a B x K buffer.
//
// Deliberately plain: scalar FMA from shared memory in the accumulation dtype (fp32, fp64 for
// float64 inputs; bf16/fp16 inputs are converted to fp32 on load), no tensor cores, no TF32. It
// is a readable baseline, not a tuned kernel. Only light headers: c10/cuda for the stream and the
// device guard (ATen/cuda/CUDAContext.h pulls cuBLAS headers that a bare toolkit may lack).
#include "info_nce.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <math.h>
#include <type_traits>

namespace adam_ext {

namespace {

constexpr int BM = 16;        // anchors per block
constexpr int BN = 16;        // bank rows per tile (<= 32: one lane per bank row in the softmax)
constexpr int NT = BM * BN;   // 256 threads: one score per thread per tile
constexpr int WARPS = NT / 32;
constexpr int ROWS_PER_WARP = BM / WARPS;  // 2 anchors per warp in the softmax/accumulate phase
static_assert(BN <= 32 && BM % WARPS == 0, "tile shape");

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Grid (nsplit, ceil(B / BM)), NT threads. Writes part_{m,l,cnt}[split, i] and part_acc[split, i, :].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(NT)
    info_nce_partial_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ bank,
                            int64_t B, int64_t D, int64_t K, int64_t rows_per_split, acc_t T, acc_t t,
                            bool need_pb, acc_t* __restrict__ part_m, acc_t* __restrict__ part_l,
                            int64_t* __restrict__ part_cnt, acc_t* __restrict__ part_acc) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t P = D + 1;           // padded row stride: the score loop reads BN rows at one d
  acc_t* qs = smem;                  // BM x P   anchors of this block
  acc_t* bs = qs + BM * P;           // BN x P   current bank tile
  acc_t* ss = bs + BN * P;           // BM x BN  scores, then probabilities
  acc_t* accs = ss + BM * BN;        // BM x D   running sum_j exp(x_ij - m_i) b_j (need_pb only)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t split = blockIdx.x;
  const int64_t i0 = int64_t(blockIdx.y) * BM;
  const int64_t j_begin = split * rows_per_split;
  const int64_t j_end = j_begin + rows_per_split < K ? j_begin + rows_per_split : K;
  const acc_t ninf = -INFINITY;

  for (int64_t e = tid; e < BM * D; e += NT) {
    const int64_t r = e / D, d = e % D;
    qs[r * P + d] = (i0 + r < B) ? static_cast<acc_t>(q[(i0 + r) * D + d]) : acc_t(0);
    if (need_pb) accs[e] = acc_t(0);
  }
  __syncthreads();  // qs/accs rows are written by other threads than the warp that owns them
  // Online-softmax state of the anchors this warp owns (rows warp + h * WARPS), same in all lanes.
  acc_t m_run[ROWS_PER_WARP], l_run[ROWS_PER_WARP];
  int64_t cnt[ROWS_PER_WARP];
  for (int h = 0; h < ROWS_PER_WARP; ++h) {
    m_run[h] = ninf;
    l_run[h] = acc_t(0);
    cnt[h] = 0;
  }

  for (int64_t jt = j_begin; jt < j_end; jt += BN) {
    __syncthreads();  // the previous tile's bs and ss are no longer read
    for (int64_t e = tid; e < BN * D; e += NT) {
      const int64_t r = e / D, d = e % D;
      const int64_t j = jt + r;
      bs[r * P + d] = (j < j_end) ? static_cast<acc_t>(bank[j * D + d]) : acc_t(0);
    }
    __syncthreads();
    {  // scores: thread (r, c) computes s = q_r . b_c
      const int r = tid / BN, c = tid % BN;
      const acc_t* qr = qs + r * P;
      const acc_t* br = bs + c * P;
      acc_t dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += qr[d] * br[d];
      ss[r * BN + c] = dot;
    }
    __syncthreads();
    for (int h = 0; h < ROWS_PER_WARP; ++h) {
      const int r = warp + h * WARPS;
      const bool valid = lane < BN && jt + lane < j_end;
      const acc_t s = valid ? ss[r * BN + lane] : acc_t(0);
      const bool kept = valid && s < t;  // purposive pruning: keep iff s_ij < t
      cnt[h] += __popc(__ballot_sync(0xffffffffu, valid && !(s < t)));
      const acc_t x = kept ? s / T : ninf;
      const acc_t m_new = fmax(m_run[h], warp_max(x));
      const acc_t sub = m_new == ninf ? acc_t(0) : m_new;  // nothing kept yet: avoid inf - inf
      const acc_t p = kept ? dexp(x - sub) : acc_t(0);
      const acc_t scale = m_run[h] == ninf ? acc_t(0) : dexp(m_run[h] - m_new);
      l_run[h] = l_run[h] * scale + warp_sum(p);
      m_run[h] = m_new;
      if (need_pb) {
        if (lane < BN) ss[r * BN + lane] = p;  // row r belongs to this warp only
        __syncwarp();
        for (int64_t d = lane; d < D; d += 32) {
          acc_t a = accs[r * D + d] * scale;
#pragma unroll
          for (int c = 0; c < BN; ++c) a += ss[r * BN + c] * bs[c * P + d];
          accs[r * D + d] = a;
        }
      }
    }
  }

  for (int h = 0; h < ROWS_PER_WARP; ++h) {
    const int r = warp + h * WARPS;
    const int64_t i = i0 + r;
    if (i >= B) continue;
    const int64_t o = split * B + i;
    if (lane == 0) {
      part_m[o] = m_run[h];
      part_l[o] = l_run[h];
      part_cnt[o] = cnt[h];
    }
    if (need_pb)
      for (int64_t d = lane; d < D; d += 32) part_acc[o * D + d] = accs[r * D + d];
  }
}

// Grid B, CT threads: merges the nsplit partial states of anchor i with its positive logit.
constexpr int CT = 128;
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(CT)
    info_nce_combine_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                            int64_t B, int64_t D, int64_t nsplit, acc_t T, bool need_pb,
                            const acc_t* __restrict__ part_m, const acc_t* __restrict__ part_l,
                            const int64_t* __restrict__ part_cnt,
                            const acc_t* __restrict__ part_acc, acc_t* __restrict__ loss,
                            acc_t* __restrict__ lse, int64_t* __restrict__ n_pruned,
                            acc_t* __restrict__ pb) {
  __shared__ acc_t red[CT / 32];
  const int64_t i = blockIdx.x;
  const int tid = threadIdx.x;
  acc_t dot = 0;
  for (int64_t d = tid; d < D; d += CT)
    dot += static_cast<acc_t>(q[i * D + d]) * static_cast<acc_t>(k[i * D + d]);
  dot = warp_sum(dot);
  if (tid % 32 == 0) red[tid / 32] = dot;
  __syncthreads();
  acc_t lpos = 0;
  for (int w = 0; w < CT / 32; ++w) lpos += red[w];
  const acc_t x0 = lpos / T;  // positive logit, always kept, finite: exp(m_s - M) is never nan

  acc_t M = x0;
  for (int64_t s = 0; s < nsplit; ++s) M = fmax(M, part_m[s * B + i]);
  acc_t L = dexp(x0 - M);
  for (int64_t s = 0; s < nsplit; ++s) L += part_l[s * B + i] * dexp(part_m[s * B + i] - M);
  if (tid == 0) {
    int64_t c = 0;
    for (int64_t s = 0; s < nsplit; ++s) c += part_cnt[s * B + i];
    lse[i] = M + dlog(L);
    loss[i] = lse[i] - x0;
    n_pruned[i] = c;
  }
  if (need_pb) {
    for (int64_t d = tid; d < D; d += CT) {
      acc_t a = 0;
      for (int64_t s = 0; s < nsplit; ++s)
        a += part_acc[(s * B + i) * D + d] * dexp(part_m[s * B + i] - M);
      pb[i * D + d] = a / L;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> info_nce_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature,
    double threshold, bool need_pb) {
  check_inputs(q, k, queue, temperature, threshold);
  TORCH_CHECK(q.is_cuda(), "adam::info_nce: CUDA kernel got q on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), D = q.size(1), K = queue.size(0);
  TORCH_CHECK(B <= 65535LL * BM, "adam::info_nce: B = ", B, " anchors is more than this kernel's grid allows");
  const auto acc = acc_dtype(q.scalar_type());
  auto opts = q.options().dtype(acc);
  at::Tensor loss = at::empty({B}, opts), lse = at::empty({B}, opts);
  at::Tensor n_pruned = at::empty({B}, opts.dtype(at::kLong));
  at::Tensor pb = at::empty({B, need_pb ? D : 0}, opts);

  int dev = q.get_device(), sms = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  // About 4 blocks per SM in total; each split gets a multiple of BN bank rows.
  const int64_t row_tiles = (B + BM - 1) / BM;
  const int64_t bank_tiles = (K + BN - 1) / BN;
  int64_t nsplit = std::max<int64_t>(1, std::min<int64_t>((4 * sms + row_tiles - 1) / row_tiles, bank_tiles));
  const int64_t rows_per_split = ((bank_tiles + nsplit - 1) / nsplit) * BN;
  nsplit = (K + rows_per_split - 1) / rows_per_split;
  TORCH_CHECK(nsplit <= 2147483647LL, "adam::info_nce: bank too large");
  at::Tensor part_m = at::empty({nsplit, B}, opts), part_l = at::empty({nsplit, B}, opts);
  at::Tensor part_cnt = at::empty({nsplit, B}, opts.dtype(at::kLong));
  at::Tensor part_acc = at::empty({need_pb ? nsplit : 0, B, D}, opts);
  auto stream = c10::cuda::getCurrentCUDAStream(dev);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "adam_info_nce_fwd_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = sizeof(acc_t) * ((BM + BN) * (D + 1) + BM * BN + (need_pb ? BM * D : 0));
    TORCH_CHECK(smem <= size_t(smem_optin), "adam::info_nce: D = ", D, " needs ", smem,
                " bytes of shared memory per block, the device has ", smem_optin);
    auto kern = info_nce_partial_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    const dim3 grid(static_cast<unsigned>(nsplit), static_cast<unsigned>(row_tiles));
    kern<<<grid, NT, smem, stream>>>(
        q.data_ptr<scalar_t>(), queue.data_ptr<scalar_t>(), B, D, K, rows_per_split,
        static_cast<acc_t>(temperature), static_cast<acc_t>(threshold), need_pb,
        part_m.data_ptr<acc_t>(), part_l.data_ptr<acc_t>(), part_cnt.data_ptr<int64_t>(),
        need_pb ? part_acc.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
