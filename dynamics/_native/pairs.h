// One pass over a gradient beside the last one: the inner product <p, g> and the squared norm
// |g|^2 (two vector accumulators, summed in double), with g copied to out on the way. Shared by
// the adjacent-gradient kernel (svdvals.cc) and the dense network's gradient (dense.cc), so
// both give the same numbers bit for bit. out may be p (read before it is written) or g.

#ifndef DYNAMICS_NATIVE_PAIRS_H_
#define DYNAMICS_NATIVE_PAIRS_H_

#include <cstdint>

namespace dynamics_pairs {

#if defined(__AVX512F__)
constexpr int kPairBytes = 64;
#else
constexpr int kPairBytes = 32;
#endif
typedef float pv __attribute__((vector_size(kPairBytes)));
constexpr int kP = kPairBytes / 4;  // floats per vector

// dot = <p, g>, sq = |g|^2 over n floats; out[i] = g[i].
inline void dot_sq_copy(const float* g, const float* p, float* out, int64_t n, float* dot,
                        float* sq) {
  pv ad0 = {}, ad1 = {}, as0 = {}, as1 = {};
  int64_t i = 0;
  for (; i + 2 * kP <= n; i += 2 * kP) {
    pv g0, g1, p0, p1;
    __builtin_memcpy(&g0, g + i, sizeof g0);
    __builtin_memcpy(&g1, g + i + kP, sizeof g1);
    __builtin_memcpy(&p0, p + i, sizeof p0);
    __builtin_memcpy(&p1, p + i + kP, sizeof p1);
    ad0 += g0 * p0;
    ad1 += g1 * p1;
    as0 += g0 * g0;
    as1 += g1 * g1;
    if (out != g) {
      __builtin_memcpy(out + i, &g0, sizeof g0);
      __builtin_memcpy(out + i + kP, &g1, sizeof g1);
    }
  }
  double d = 0.0, s2 = 0.0;
  for (int l = 0; l < kP; ++l) {
    d += static_cast<double>(ad0[l]) + ad1[l];
    s2 += static_cast<double>(as0[l]) + as1[l];
  }
  for (; i < n; ++i) {
    const float gi = g[i];
    d += static_cast<double>(gi) * p[i];
    s2 += static_cast<double>(gi) * gi;
    if (out != g) out[i] = gi;
  }
  *dot = static_cast<float>(d);
  *sq = static_cast<float>(s2);
}

}  // namespace dynamics_pairs

#endif  // DYNAMICS_NATIVE_PAIRS_H_
