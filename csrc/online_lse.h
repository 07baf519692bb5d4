// The arithmetic rules of the online log-sum-exp that every kernel of adam::info_nce_fwd shares: the CPU kernel
// (info_nce.cpp), the CUDA kernels (info_nce_kernels.cuh) and, through that file, their CPU emulation
// (tests/cuda_emu). With them the fused op agrees with the readable reference adam.info_nce on non-finite scores
// too (docs/METHOD.md §4): a kept NaN score makes the anchor's loss NaN, a kept +inf score makes it +inf, a -inf
// score adds nothing - as torch.logsumexp does. tests/test_fused_op.py and tests/test_cuda_emulated.py plant them.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define ADAM_HD __host__ __device__ __forceinline__
#else
#define ADAM_HD inline
#endif

namespace adam_ext {

ADAM_HD float dexp(float x) { return expf(x); }
ADAM_HD double dexp(double x) { return exp(x); }
ADAM_HD float dlog(float x) { return logf(x); }
ADAM_HD double dlog(double x) { return log(x); }

namespace lse {

// Purposive pruning: entry j is dropped for anchor i iff s_ij >= t. t = +inf means no pruning (the reference's
// threshold None): every entry is kept, a score of +inf too. A NaN score is never dropped (NaN >= t is false).
template <typename T>
ADAM_HD bool pruned(T s, T t) {
  return t != T(INFINITY) && s >= t;
}

// What is subtracted from the scores before exp: the running max m, or 0 where m is infinite. m = -inf: nothing
// kept yet (-inf - -inf would be NaN; every exp is 0 anyway); m = +inf: a kept +inf score, whose exp is the +inf
// the sum must become (+inf - +inf would be NaN).
template <typename T>
ADAM_HD T shift(T m) {
  return m == T(INFINITY) || m == T(-INFINITY) ? T(0) : m;
}

// exp(a - m), the factor that takes a sum kept relative to the max a to the max m >= a. 1 where a == m, which
// exp(0) is for finite a and which keeps a sum of +inf at +inf where a == m == +inf (exp(inf - inf) would be NaN).
template <typename T>
ADAM_HD T rescale(T a, T m) {
  return a == m ? T(1) : dexp(a - m);
}

}  // namespace lse
}  // namespace adam_ext
