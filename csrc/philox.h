// Counter-based normal noise for posterior_step, shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with
//   key     = (seed mod 2^32, seed div 2^32)                   (seed as a signed 64-bit value)
//   counter = (q mod 2^32, q div 2^32, step mod 2^32, step div 2^32),  q = i / 4
// turns the four output words w into uniforms u = |int32(w)| * 4.6566127342e-10 (|.| as ~w for
// negative words, so the result is below 1) and those into two Box-Muller pairs
//   (u0, u1) -> r cos(t), r sin(t),  r = sqrt(-2 ln max(u0, 1e-7)),  t = 2 pi u1 - pi,  same for (u2, u3)
// (t in [-pi, pi), where fast hardware sine and cosine are accurate); element i takes normal
// number i mod 4. This is the stream that kernels/posterior_step.py draws with tl.philox and
// tl.uint_to_uniform_float, so the cpp and triton backends give the same noise for the same
// (seed, step) up to the last bits of float32 log/sin/cos (tests/test_cpp_ext.py checks it).
// It depends only on (seed, step, i): not on threads, blocks or the tensor's size.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SR3_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SR3_HOST_DEVICE inline
#endif

namespace sr3 {

SR3_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds on counter c with key (k0, k1), in place.
SR3_HOST_DEVICE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint32_t c0 = c[0], c2 = c[2];
    c[0] = philox_mulhi(kRoundB, c2) ^ c[1] ^ k0;
    c[2] = philox_mulhi(kRoundA, c0) ^ c[3] ^ k1;
    c[1] = kRoundB * c2;
    c[3] = kRoundA * c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

SR3_HOST_DEVICE float philox_uniform(uint32_t word) {
  const int32_t s = static_cast<int32_t>(word);
  return static_cast<float>(s < 0 ? ~s : s) * 4.6566127342e-10f;
}

// The four standard normals of quad q = i / 4 for (seed, step), in element order.
SR3_HOST_DEVICE void philox_normal4(int64_t seed, int64_t step, int64_t quad, float out[4]) {
  const uint64_t key = static_cast<uint64_t>(seed), s = static_cast<uint64_t>(step);
  const uint64_t q = static_cast<uint64_t>(quad);
  uint32_t c[4] = {static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), static_cast<uint32_t>(s),
                   static_cast<uint32_t>(s >> 32)};
  philox4x32_10(c, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  for (int pair = 0; pair < 2; ++pair) {
    const float u0 = fmaxf(philox_uniform(c[2 * pair]), 1.0e-7f);
    const float theta = 6.283185307179586f * philox_uniform(c[2 * pair + 1]) - 3.141592653589793f;
    const float r = sqrtf(-2.0f * logf(u0));
    out[2 * pair] = r * cosf(theta);
    out[2 * pair + 1] = r * sinf(theta);
  }
}

}  // namespace sr3
