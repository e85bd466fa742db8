// The Threefry-2x32 hash of JAX's default random number generator (20 rounds, Salmon et al.
// 2011, "Parallel random numbers: as easy as 1, 2, 3"), for XLA's CPU backend: an XLA FFI
// custom call, compiled and registered by dynamics/native.py.
//
// It computes what JAX's own lowering of `threefry2x32_p` computes (jax/_src/random/
// threefry2x32.py: the key schedule ks = (k1, k2, k1 ^ k2 ^ 0x1BD11BDA), five groups of four
// rounds with rotations (13, 15, 26, 6) and (17, 29, 16, 24), a key injection after each group),
// in unsigned 32-bit integer arithmetic, so the bits are the same bit for bit. XLA compiles its
// own lowering as elementwise loop kernels that LLVM takes about a second to optimize for each
// random draw of a program; this call costs nothing to compile.

#include <cstddef>
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

inline uint32_t rotl(uint32_t v, int d) { return (v << d) | (v >> (32 - d)); }

inline void hash(uint32_t k1, uint32_t k2, uint32_t& x0, uint32_t& x1) {
  static const int kRot[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {k1, k2, k1 ^ k2 ^ 0x1BD11BDAu};
  x0 += ks[0];
  x1 += ks[1];
  for (int g = 0; g < 5; ++g) {
    const int* r = kRot[g % 2];
    for (int i = 0; i < 4; ++i) {
      x0 += x1;
      x1 = rotl(x1, r[i]);
      x1 ^= x0;
    }
    x0 += ks[(g + 1) % 3];
    x1 += ks[(g + 2) % 3] + static_cast<uint32_t>(g + 1);
  }
}

}  // namespace

// Arguments: k1, k2, x1, x2 (uint32, all of one shape: the caller broadcasts them); results:
// the two output words, of that shape.
static ffi::Error Threefry2x32Impl(ffi::Buffer<ffi::U32> k1, ffi::Buffer<ffi::U32> k2,
                                   ffi::Buffer<ffi::U32> x1, ffi::Buffer<ffi::U32> x2,
                                   ffi::ResultBuffer<ffi::U32> y1,
                                   ffi::ResultBuffer<ffi::U32> y2) {
  const size_t n = x1.element_count();
  if (k1.element_count() != n || k2.element_count() != n || x2.element_count() != n)
    return ffi::Error::InvalidArgument("threefry2x32: the four arguments must have one shape");
  const uint32_t* a = k1.typed_data();
  const uint32_t* b = k2.typed_data();
  const uint32_t* c = x1.typed_data();
  const uint32_t* d = x2.typed_data();
  uint32_t* o1 = y1->typed_data();
  uint32_t* o2 = y2->typed_data();
  for (size_t i = 0; i < n; ++i) {
    uint32_t v0 = c[i], v1 = d[i];
    hash(a[i], b[i], v0, v1);
    o1[i] = v0;
    o2[i] = v1;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DynamicsThreefry2x32, Threefry2x32Impl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>()
                                  .Ret<ffi::Buffer<ffi::U32>>());
