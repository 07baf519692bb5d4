// Device code of adam::info_nce_fwd on CUDA (math and outputs: info_nce.cpp; launcher:
// info_nce_cuda.cu). Kept apart from ATen so that tests/cuda_emu can compile the very same
// kernels for the CPU, run every "thread" of a block as a fiber, and compare the result with
// the reference on machines without a GPU (tests/test_cuda_emulated.py). That is why this file
// uses only: threadIdx/blockIdx, __syncthreads, __syncwarp, __shfl_xor_sync, __ballot_sync,
// __popc, __uint_as_float, float4/uint2/make_float4, expf/logf/fmax and the ADAM_DYNAMIC_SMEM
// macro below (no cooperative groups, no intrinsics the emulator lacks). The rules of the online
// log-sum-exp for non-finite scores (pruning with t = +inf, the shift, the rescale) are those of
// the CPU kernel, from online_lse.h.
//
// Two kernels compute the same partial states; one merge kernel finishes both.
//
//  * info_nce_partial_kernel (SIMPLE): the readable one. Split-K over the bank as split-KV
//    flash-decoding: B is small and K large, so the bank is cut into `nsplit` ranges and each
//    block (one tile of BM anchors x one bank range) walks its range in tiles of BN rows, keeping
//    per anchor the online log-sum-exp state (running max m, running sum l) and
//    acc = sum_j exp(x_ij - m) b_j in shared memory. One score per thread from shared memory,
//    scalar FMA in the accumulation dtype (fp32; fp64 for float64, which gradcheck needs).
//  * info_nce_partial_tiled_kernel (TILED): the same walk with a 64 x 64 tile and a 4 x 4
//    register micro-tile per thread (a classic SIMT SGEMM blocking): scores from float4 shared
//    loads, the softmax on registers, acc += P B with acc in registers, 16-byte global loads.
//    fp32 FMA only: no TF32, so it matches torch's default "highest" float32 matmul precision,
//    and no tensor cores for bf16 either (inputs are upcast on load). float32 and bf16 inputs,
//    D in {64, 128, 256} (compile-time, so the register arrays stay in registers).
//  * info_nce_partial_tc_kernel (TC): the same walk on tensor cores (TF32 mma.sync), for bf16
//    inputs and for float32 when torch allows TF32 matmuls; D in {64, 128}.
//  * info_nce_combine_kernel: merges the nsplit partial states of each anchor with its positive.
//
// Extra memory: nsplit x B x (D + 3) partials, nsplit chosen from the SM count, so
// O(SMs x tile x D) and independent of K; never a B x K buffer.
#pragma once

#include <math.h>
#include <stdint.h>

#include "online_lse.h"

#ifndef ADAM_DYNAMIC_SMEM
#define ADAM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace adam_ext {
namespace kernels {

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

// ---------------------------------------------------------------------------------------------
// SIMPLE kernel. Grid (nsplit, ceil(B / BM)), NT threads.
// Writes part_{m,l,cnt}[split * B + i] and part_acc[(split * B + i) * D + d].
namespace simple {
constexpr int BM = 16;        // anchors per block
constexpr int BN = 16;        // bank rows per tile (<= 32: one lane per bank row in the softmax)
constexpr int NT = BM * BN;   // 256 threads: one score per thread per tile
constexpr int WARPS = NT / 32;
constexpr int ROWS_PER_WARP = BM / WARPS;  // 2 anchors per warp in the softmax/accumulate phase
static_assert(BN <= 32 && BM % WARPS == 0, "tile shape");
// q tile, bank tile (rows padded to D + 1), scores, and the running sum of p b when it is needed.
inline int64_t smem_bytes(int64_t D, bool need_pb, int64_t acc_size) {
  return acc_size * ((BM + BN) * (D + 1) + BM * BN + (need_pb ? BM * D : 0));
}
}  // namespace simple

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(simple::NT)
    info_nce_partial_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ bank,
                            int64_t B, int64_t D, int64_t K, int64_t rows_per_split, acc_t T, acc_t t,
                            bool need_pb, acc_t* __restrict__ part_m, acc_t* __restrict__ part_l,
                            int64_t* __restrict__ part_cnt, acc_t* __restrict__ part_acc) {
  using namespace simple;
  ADAM_DYNAMIC_SMEM(smem_raw);
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
      const bool drop = valid && lse::pruned(s, t);  // purposive pruning: drop iff s_ij >= t (NaN kept)
      const bool kept = valid && !drop;
      cnt[h] += __popc(__ballot_sync(0xffffffffu, drop));
      const acc_t x = kept ? s / T : ninf;
      const acc_t m_new = fmax(m_run[h], warp_max(x));
      const acc_t sub = lse::shift(m_new);  // 0 where m_new is +-inf: no inf - inf
      const acc_t p = kept ? dexp(x - sub) : acc_t(0);
      const acc_t scale = lse::rescale(m_run[h], m_new);
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

// ---------------------------------------------------------------------------------------------
// TILED kernel. Grid (ceil(B / BM), nsplit): the row tiles of one bank range are neighbours in
// launch order, so the blocks that read the same bank rows run together and share them in L2.
// Thread (ty, tx) = (tid / 16, tid % 16) owns anchors ty*4 .. ty*4+3 of the block, bank rows
// tx + 16c (c < 4) of each tile for the scores, and columns 4 tx + 64 e of acc. The 16 lanes of
// one ty are one half-warp, so a row's max and sum are shuffles over xor 8, 4, 2, 1.
// Shared-memory strides (D + 4 floats for q and bank tiles, BN + 4 for P) make the float4 reads
// of 8 consecutive rows hit 8 different 16-byte bank groups ((D + 4) / 4 is odd for D % 8 == 0).
namespace tiled {
constexpr int NT = 256, TX = 16, TY = 16, TM = 4, TN = 4;
constexpr int BM = TY * TM;   // 64 anchors per block
constexpr int BN = TX * TN;   // 64 bank rows per tile
constexpr int PS = BN + 4;    // row stride of the P tile
inline bool supports(int64_t D) { return D == 64 || D == 128 || D == 256; }
inline int64_t smem_bytes(int64_t D) { return int64_t(sizeof(float)) * ((BM + BN) * (D + 4) + BM * PS); }
inline int min_blocks(int64_t D) { return D <= 128 ? 2 : 1; }  // what __launch_bounds__ promises
}  // namespace tiled

// One bank tile of one anchor's online log-sum-exp, shared by the tiled and tc kernels. The row's
// scores s_ij are spread over LANES threads (lanes differing in their low log2(LANES) bits), N
// per thread in x; valid[n] says whether x[n] is a real bank row. Applies the purposive pruner
// (drop iff s_ij >= t, none dropped for t = +inf; a NaN score is kept and poisons the sum as in the
// reference, docs/METHOD.md §4), counts what it prunes, turns x into p = exp(s_ij/T - m_new)
// (0 for pruned and padding), folds the tile into (m_run, l_run) and returns the factor
// exp(m_old - m_new) by which the row's running sum of p b must be rescaled.
template <int N, int LANES>
__device__ __forceinline__ float lse_tile(float (&x)[N], const bool (&valid)[N], float T, float t,
                                          float& m_run, float& l_run, int& cnt) {
  const float ninf = -INFINITY;
  float mx = ninf;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const bool kept = valid[n] && !lse::pruned(x[n], t);
    cnt += (valid[n] && !kept) ? 1 : 0;
    x[n] = kept ? x[n] / T : ninf;
    mx = fmax(mx, x[n]);
  }
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float m_new = fmax(m_run, mx);
  const float sub = lse::shift(m_new);  // 0 where m_new is +-inf: no inf - inf
  float psum = 0.f;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    x[n] = expf(x[n] - sub);  // pruned and padded: exp(-inf) = 0
    psum += x[n];
  }
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
  const float scale = lse::rescale(m_run, m_new);
  l_run = l_run * scale + psum;
  m_run = m_new;
  return scale;
}

// The end of a block's walk for one anchor (row i of the batch; rows >= B are padding): the
// pruned count summed over the row's LANES lanes, then (m, l, count) written by its first lane at
// split * B + i. Returns whether the row is real (then the caller writes its sum of p b).
template <int LANES>
__device__ __forceinline__ bool write_row_state(int64_t i, int64_t B, int64_t split, bool first_lane,
                                                float m_run, float l_run, int cnt, float* part_m,
                                                float* part_l, int64_t* part_cnt) {
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
  if (i >= B) return false;
  if (first_lane) {
    part_m[split * B + i] = m_run;
    part_l[split * B + i] = l_run;
    part_cnt[split * B + i] = cnt;
  }
  return true;
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
// 4 bf16 values given as raw bits: a bf16 is the upper half of a float32, so upcasting is a shift.
__device__ __forceinline__ float4 load4(const uint16_t* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

#ifndef ADAM_CUDA_EMU  // (the emulator brings its own)
// Round to TF32 (nearest, ties away) for the tc kernel, returned as float bits with the low 13 bits zero.
__device__ __forceinline__ float to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return __uint_as_float(r);
#else
  return x;  // never runs: the launcher picks the tc kernel on sm_80+ only
#endif
}
#endif

// Rows row0 .. row0 + ROWS - 1 of a row-major (., D) matrix into a ROWS x (D + 4) float tile in
// shared memory, 16 bytes per access, zeros from row row_end on (padding the last tile). TF32:
// rounded for the tensor cores. Every thread of the NT-thread block takes part.
template <int D, int ROWS, int NT, bool TF32, typename scalar_t>
__device__ __forceinline__ void load_rows(float* tile, const scalar_t* src, int64_t row0, int64_t row_end, int tid) {
  constexpr int D4 = D / 4;
#pragma unroll 4
  for (int e = tid; e < ROWS * D4; e += NT) {
    const int r = e / D4, c4 = e % D4;
    float4 v = row0 + r < row_end ? load4(src + (row0 + r) * D + 4 * c4) : make_float4(0.f, 0.f, 0.f, 0.f);
    if (TF32) v = make_float4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w));
    *reinterpret_cast<float4*>(tile + r * (D + 4) + 4 * c4) = v;
  }
}

// scalar_t: float, or uint16_t holding bf16 bits. Accumulates in fp32.
template <typename scalar_t, int D, int MIN_BLOCKS>
__global__ void __launch_bounds__(tiled::NT, MIN_BLOCKS)
    info_nce_partial_tiled_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ bank,
                                  int64_t B, int64_t K, int64_t rows_per_split, float T, float t,
                                  bool need_pb, float* __restrict__ part_m, float* __restrict__ part_l,
                                  int64_t* __restrict__ part_cnt, float* __restrict__ part_acc) {
  using namespace tiled;
  constexpr int P = D + 4;           // row stride of the q and bank tiles
  constexpr int D4 = D / 4;          // float4 chunks per row
  constexpr int DE = D / 64;         // float4 accumulators per anchor per thread
  constexpr int LD = BN * D4 / NT;   // float4 bank loads per thread per tile
  static_assert(D % 64 == 0 && (BN * D4) % NT == 0 && (BM * D4) % NT == 0, "tile shape");
  ADAM_DYNAMIC_SMEM(smem_raw);
  float* qs = reinterpret_cast<float*>(smem_raw);  // BM x P   anchors of this block
  float* bs = qs + BM * P;                         // BN x P   current bank tile
  float* ps = bs + BN * P;                         // BM x PS  probabilities of the tile
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t j_begin = split * rows_per_split;
  const int64_t j_end = j_begin + rows_per_split < K ? j_begin + rows_per_split : K;
  const float ninf = -INFINITY;
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);

  load_rows<D, BM, NT, false>(qs, q, i0, B, tid);  // anchors beyond B are zero rows, never written out
  float m_run[TM], l_run[TM];
  int cnt[TM];
  float4 acc[TM][DE];
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    m_run[r] = ninf;
    l_run[r] = 0.f;
    cnt[r] = 0;
#pragma unroll
    for (int e = 0; e < DE; ++e) acc[r][e] = zero4;
  }

  for (int64_t jt = j_begin; jt < j_end; jt += BN) {
    // The bank tile: LD float4 loads per thread, all issued before the first store. No prefetch of
    // the next tile: it cost D = 128 its registers (spills), and a tile takes some 8k cycles of
    // FMA per block against ~1k of load latency, which the SM's other block covers.
    float4 v[LD];
#pragma unroll
    for (int u = 0; u < LD; ++u) {
      const int e = tid + u * NT, r = e / D4, c4 = e % D4;
      v[u] = (jt + r < j_end) ? load4(bank + (jt + r) * D + 4 * c4) : zero4;  // rows past the range: 0
    }
    __syncthreads();  // all reads of the previous bs and ps are done (and qs is complete)
#pragma unroll
    for (int u = 0; u < LD; ++u) {
      const int e = tid + u * NT, r = e / D4, c4 = e % D4;
      *reinterpret_cast<float4*>(bs + r * P + 4 * c4) = v[u];
    }
    __syncthreads();

    // Scores s[r][c] = q_(ty*4+r) . b_(jt + tx + 16c), 4 dims at a time.
    float s[TM][TN];
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) s[r][c] = 0.f;
#pragma unroll 2
    for (int d = 0; d < D; d += 4) {
      float4 a[TM];
#pragma unroll
      for (int r = 0; r < TM; ++r) a[r] = *reinterpret_cast<const float4*>(qs + (ty * TM + r) * P + d);
#pragma unroll
      for (int c = 0; c < TN; ++c) {
        const float4 b = *reinterpret_cast<const float4*>(bs + (tx + TX * c) * P + d);
#pragma unroll
        for (int r = 0; r < TM; ++r) s[r][c] += a[r].x * b.x + a[r].y * b.y + a[r].z * b.z + a[r].w * b.w;
      }
    }

    // Purposive pruning and the online log-sum-exp, row by row; s becomes p.
#pragma unroll
    for (int r = 0; r < TM; ++r) {
      bool valid[TN];
#pragma unroll
      for (int c = 0; c < TN; ++c) valid[c] = jt + tx + TX * c < j_end;
      const float scale = lse_tile<TN, TX>(s[r], valid, T, t, m_run[r], l_run[r], cnt[r]);
      if (need_pb) {
#pragma unroll
        for (int e = 0; e < DE; ++e) {
          acc[r][e].x *= scale;
          acc[r][e].y *= scale;
          acc[r][e].z *= scale;
          acc[r][e].w *= scale;
        }
#pragma unroll
        for (int c = 0; c < TN; ++c) ps[(ty * TM + r) * PS + tx + TX * c] = s[r][c];
      }
    }

    if (need_pb) {  // acc[r] += sum_c p[r][c] b_c over the tile's 64 rows, 4 at a time
      __syncthreads();  // the whole P tile is written
#pragma unroll 1
      for (int c = 0; c < BN; c += 4) {
        float4 pv[TM];
#pragma unroll
        for (int r = 0; r < TM; ++r) pv[r] = *reinterpret_cast<const float4*>(ps + (ty * TM + r) * PS + c);
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
#pragma unroll
          for (int e = 0; e < DE; ++e) {
            const float4 bv = *reinterpret_cast<const float4*>(bs + (c + cc) * P + 4 * tx + 64 * e);
#pragma unroll
            for (int r = 0; r < TM; ++r) {
              const float p = cc == 0 ? pv[r].x : cc == 1 ? pv[r].y : cc == 2 ? pv[r].z : pv[r].w;
              acc[r][e].x += p * bv.x;
              acc[r][e].y += p * bv.y;
              acc[r][e].z += p * bv.z;
              acc[r][e].w += p * bv.w;
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int64_t i = i0 + ty * TM + r;
    if (write_row_state<TX>(i, B, split, tx == 0, m_run[r], l_run[r], cnt[r], part_m, part_l, part_cnt) && need_pb) {
#pragma unroll
      for (int e = 0; e < DE; ++e)
        *reinterpret_cast<float4*>(part_acc + (split * B + i) * D + 4 * tx + 64 * e) = acc[r][e];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TC kernel: the tiled walk on tensor cores, TF32 mma.sync (m16n8k8, fp32 accumulation), as
// FlashAttention-2 does it with the bank as both keys and values. Runs for bf16 inputs (exact in
// TF32) and for float32 inputs only when torch allows TF32 for float32 matmuls
// (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision("high")): operands are
// rounded to TF32 (10-bit mantissa) like cuBLAS does then, P included. D in {64, 128}.
// Block: 4 warps, each owning 16 anchors (the m of the mma) against a 64-row bank tile:
// S_w = Q_w B^T (16 x 64, 8 n-blocks), pruning and the online log-sum-exp on S's registers, P_w
// through the warp's own rows of shared memory (the accumulator and A-operand layouts differ for
// TF32), then O_w += P_w B (16 x D). Fragment layouts (PTX ISA, mma.m16n8k8 .tf32), with
// g = lane / 4 and c = lane % 4:  A a0 (g, c) a1 (g+8, c) a2 (g, c+4) a3 (g+8, c+4);
// B b0 (k = c, n = g) b1 (k = c+4, n = g);  C c0 (g, 2c) c1 (g, 2c+1) c2 (g+8, 2c) c3 (g+8, 2c+1).
// tests/cuda_emu implements mma_tf32 from the same table.
namespace tc {
constexpr int WARPS = 4, NT = 32 * WARPS;
constexpr int BM = 16 * WARPS;  // 64 anchors per block
constexpr int BN = 64;          // bank rows per tile
constexpr int PS = BN + 4;      // row stride of the P tile
inline bool supports(int64_t D) { return D == 64 || D == 128; }
inline int64_t smem_bytes(int64_t D) { return int64_t(sizeof(float)) * ((BM + BN) * (D + 4) + BM * PS); }
}  // namespace tc

#ifndef ADAM_CUDA_EMU
// d += A B for one 16 x 8 x 8 TF32 tile (fragments as in the table above).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(__float_as_uint(a[0])), "r"(__float_as_uint(a[1])), "r"(__float_as_uint(a[2])),
        "r"(__float_as_uint(a[3])), "r"(__float_as_uint(b[0])), "r"(__float_as_uint(b[1])));
#else
  __trap();  // the launcher never picks this kernel below sm_80
#endif
}
#endif

// scalar_t: float, or uint16_t holding bf16 bits.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(tc::NT)
    info_nce_partial_tc_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ bank,
                               int64_t B, int64_t K, int64_t rows_per_split, float T, float t,
                               bool need_pb, float* __restrict__ part_m, float* __restrict__ part_l,
                               int64_t* __restrict__ part_cnt, float* __restrict__ part_acc) {
  using namespace tc;
  constexpr int P = D + 4;
  constexpr int NB = BN / 8;  // n-blocks of S
  constexpr int NO = D / 8;   // n-blocks of O
  static_assert(D % 64 == 0, "tile shape");
  ADAM_DYNAMIC_SMEM(smem_raw);
  float* qs = reinterpret_cast<float*>(smem_raw);  // BM x P   anchors, TF32-rounded
  float* bs = qs + BM * P;                         // BN x P   bank tile, TF32-rounded
  float* ps = bs + BN * P;                         // BM x PS  P, TF32-rounded; warp w owns rows 16w..16w+15
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c = lane % 4;
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t j_begin = split * rows_per_split;
  const int64_t j_end = j_begin + rows_per_split < K ? j_begin + rows_per_split : K;
  const float ninf = -INFINITY;
  const int ra = warp * 16 + g;  // this thread's two anchors (rows of the block): ra and ra + 8

  load_rows<D, BM, NT, true>(qs, q, i0, B, tid);
  float m_run[2] = {ninf, ninf}, l_run[2] = {0.f, 0.f};
  int cnt[2] = {0, 0};
  float o[NO][4];
#pragma unroll
  for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  for (int64_t jt = j_begin; jt < j_end; jt += BN) {
    __syncthreads();  // all reads of the previous bs are done (and qs is complete)
    load_rows<D, BN, NT, true>(bs, bank, jt, j_end, tid);
    __syncthreads();

    float s[NB][4];  // S_w: s[n][0..3] at (ra, 8n+2c), (ra, 8n+2c+1), (ra+8, 8n+2c), (ra+8, 8n+2c+1)
#pragma unroll
    for (int n = 0; n < NB; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll 4
    for (int k0 = 0; k0 < D; k0 += 8) {
      const float a[4] = {qs[ra * P + k0 + c], qs[(ra + 8) * P + k0 + c], qs[ra * P + k0 + c + 4],
                          qs[(ra + 8) * P + k0 + c + 4]};
#pragma unroll
      for (int n = 0; n < NB; ++n) {
        const float b[2] = {bs[(8 * n + g) * P + k0 + c], bs[(8 * n + g) * P + k0 + c + 4]};
        mma_tf32(s[n], a, b);
      }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {  // row ra + 8h: entries s[n][2h], s[n][2h+1], spread over the 4 lanes c
      float x[2 * NB];
      bool valid[2 * NB];
#pragma unroll
      for (int n = 0; n < NB; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          x[2 * n + e] = s[n][2 * h + e];
          valid[2 * n + e] = jt + 8 * n + 2 * c + e < j_end;
        }
      const float scale = lse_tile<2 * NB, 4>(x, valid, T, t, m_run[h], l_run[h], cnt[h]);
      if (need_pb) {
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          o[n][2 * h] *= scale;
          o[n][2 * h + 1] *= scale;
        }
#pragma unroll
        for (int n = 0; n < 2 * NB; ++n) ps[(ra + 8 * h) * PS + 8 * (n / 2) + 2 * c + n % 2] = to_tf32(x[n]);
      }
    }

    if (need_pb) {  // O_w += P_w (16 x 64) B_tile (64 x D)
      __syncwarp();  // P_w's rows are written and read by this warp only
#pragma unroll 2
      for (int k0 = 0; k0 < BN; k0 += 8) {
        const float a[4] = {ps[ra * PS + k0 + c], ps[(ra + 8) * PS + k0 + c], ps[ra * PS + k0 + c + 4],
                            ps[(ra + 8) * PS + k0 + c + 4]};
#pragma unroll
        for (int n = 0; n < NO; ++n) {
          const float b[2] = {bs[(k0 + c) * P + 8 * n + g], bs[(k0 + c + 4) * P + 8 * n + g]};
          mma_tf32(o[n], a, b);
        }
      }
      __syncwarp();  // P_w is read before the next tile overwrites it
    }
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = i0 + ra + 8 * h;
    if (write_row_state<4>(i, B, split, c == 0, m_run[h], l_run[h], cnt[h], part_m, part_l, part_cnt) && need_pb) {
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        part_acc[(split * B + i) * D + 8 * n + 2 * c] = o[n][2 * h];
        part_acc[(split * B + i) * D + 8 * n + 2 * c + 1] = o[n][2 * h + 1];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Merge: grid B, CT threads; the nsplit partial states of anchor i with its positive logit.
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
  const acc_t x0 = lpos / T;  // positive logit, always kept

  acc_t M = x0;
  for (int64_t s = 0; s < nsplit; ++s) M = fmax(M, part_m[s * B + i]);
  acc_t L = lse::rescale(x0, M);  // M = +inf (a kept +inf score): L and lse are +inf, not NaN
  for (int64_t s = 0; s < nsplit; ++s) L += part_l[s * B + i] * lse::rescale(part_m[s * B + i], M);
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
        a += part_acc[(s * B + i) * D + d] * lse::rescale(part_m[s * B + i], M);
      pb[i * D + d] = a / L;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side (shared by the launcher and the emulator): the tiled/tc kernel instance for D, with
// its block size and dynamic shared memory, handed to launch(kernel, threads, smem_bytes). D must be
// one the kernel supports (tiled::supports, tc::supports): callers check first.
enum class Kernel { SIMPLE, TILED, TC };
template <typename raw_t, typename F>
void with_fast_kernel(Kernel kind, int64_t D, F&& launch) {
  if (kind == Kernel::TC) {
    if (D == 64) launch(info_nce_partial_tc_kernel<raw_t, 64>, tc::NT, tc::smem_bytes(D));
    else launch(info_nce_partial_tc_kernel<raw_t, 128>, tc::NT, tc::smem_bytes(D));
  } else {
    if (D == 64) launch(info_nce_partial_tiled_kernel<raw_t, 64, 2>, tiled::NT, tiled::smem_bytes(D));
    else if (D == 128) launch(info_nce_partial_tiled_kernel<raw_t, 128, 2>, tiled::NT, tiled::smem_bytes(D));
    else launch(info_nce_partial_tiled_kernel<raw_t, 256, 1>, tiled::NT, tiled::smem_bytes(D));
  }
}

// Host side (shared by the launcher and the emulator): how the work is cut. Row tiles of BM
// anchors; the bank in `nsplit` ranges of whole BN-row tiles, none empty, so that there are about
// two waves of what the SMs hold at once (tiled, tc) or 4 blocks per SM (simple).
struct Plan {
  int64_t row_tiles, nsplit, rows_per_split;
};
inline Plan plan(Kernel kind, int64_t B, int64_t D, int64_t K, int64_t sms) {
  const int64_t BM = kind == Kernel::SIMPLE ? simple::BM : kind == Kernel::TILED ? tiled::BM : tc::BM;
  const int64_t BN = kind == Kernel::SIMPLE ? simple::BN : kind == Kernel::TILED ? tiled::BN : tc::BN;
  // Resident blocks per SM, twice. tc: 3 at D = 64 (ptxas: 165 registers x 128 threads), 2 at
  // D = 128 (85 KiB of shared memory each).
  const int64_t per_sm = kind == Kernel::SIMPLE ? 4
                         : kind == Kernel::TILED ? 2 * tiled::min_blocks(D)
                                                 : 2 * (D <= 64 ? 3 : 2);
  const int64_t row_tiles = (B + BM - 1) / BM;
  const int64_t wanted = per_sm * sms;
  const int64_t bank_tiles = (K + BN - 1) / BN;
  int64_t nsplit = (wanted + row_tiles - 1) / row_tiles;
  nsplit = nsplit < 1 ? 1 : nsplit > bank_tiles ? bank_tiles : nsplit;
  nsplit = nsplit > 65535 ? 65535 : nsplit;  // a grid dimension of the tiled kernels
  const int64_t rows_per_split = ((bank_tiles + nsplit - 1) / nsplit) * BN;
  return {row_tiles, (K + rows_per_split - 1) / rows_per_split, rows_per_split};
}

}  // namespace kernels
}  // namespace adam_ext
