// Element types and float math for the CPU kernels, written so that GCC and Clang vectorise
// the loops that use them (no calls into libm, no branches: only float/int arithmetic, selects
// of bits and bit casts).
//
// - Float16 / BFloat16 convert to float exactly; float converts back with round-to-nearest-even
//   (NaN stays NaN, overflow gives infinity), the same results as c10::Half / c10::BFloat16.
//   The fp16 conversions are Marat Dukhan's branch-free FP16 library algorithms.
// - exp_nonpositive reduces x = n ln 2 + r (|r| <= ln 2 / 2, Cephes' two-part ln 2) and takes
//   exp(r) = 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3), coefficients fitted for minimax relative
//   error: at most 1.8e-7 relative error on [-87, 0] in float32 (measured on 2e6 points), two
//   multiply-adds fewer than Cephes' expf, which matters because silu's exp bounds this kernel.
//   Below -87 (and for NaN) it returns about exp(-87) = 1.6e-38, which silu turns into
//   t * 1.6e-38 where the true value is smaller still.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>

#include "../sr3_kernels.h"

namespace sr3::cpu {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

// cond ? a : b through a mask. A select whose operands are float results lets GCC move the
// float operation under the condition, and under its default -ftrapping-math it will not
// if-convert that again: the whole loop stays scalar (7x slower). A mask keeps both computed.
inline uint32_t select_bits(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

struct Float32 {
  using Storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct Float16 {
  using Storage = uint16_t;
  static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = select_bits(two_w < (1u << 27), float_to_bits(denormalized), float_to_bits(normalized));
    return bits_to_float(sign | magnitude);
  }
  static uint16_t store(float f) {
    const float abs_f = bits_to_float(float_to_bits(f) & 0x7FFFFFFFu);
    float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return static_cast<uint16_t>((sign >> 16) | select_bits(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
  }
};

struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }
  static uint16_t store(float f) {
    const uint32_t bits = float_to_bits(f);
    const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded >> 16);
  }
};

// dst[i] = BFloat16::store(src[i]) for i < n, on `path` (bf16.cpp); equal bits but for what
// sr3_kernels.h's Bf16Path says.
void store_bf16(Bf16Path path, const float* src, uint16_t* dst, int64_t n);

// Calls f(Float32{}), f(Float16{}) or f(BFloat16{}) for `dtype`.
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(Float32{}); return;
    case DType::kFloat16: f(Float16{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
  }
}

// exp(x) for x <= 0 (positive x are not supported).
inline float exp_nonpositive(float x) {
  // The clamp works on the bits (for x <= 0, a larger magnitude is a larger unsigned integer;
  // NaN's is larger than any), for the reason select_bits gives.
  x = -bits_to_float(std::min(float_to_bits(x) & 0x7FFFFFFFu, float_to_bits(87.0f)));
  // Adding 1.5 * 2^23 rounds x / ln 2 to the integer n and leaves n in the low mantissa bits,
  // so 2^n is built from those bits without a libm call or a float-to-int conversion.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 8.3125206e-3f;
  p = p * r + 4.1890115e-2f;
  p = p * r + 1.6667114e-1f;
  p = p * r + 4.9999231e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((float_to_bits(shifted) - 0x4B400000u + 127u) << 23);
}

// silu(t) = t * sigmoid(t) with e = exp(-|t|) <= 1: sigmoid is 1 / (1 + e) for t >= 0 and
// e / (1 + e) below, so exp never overflows and one division serves both signs.
inline float silu(float t) {
  const float e = exp_nonpositive(bits_to_float(float_to_bits(t) | 0x80000000u));
  const float sigmoid_numerator = bits_to_float(select_bits(float_to_bits(t) >> 31, float_to_bits(e), float_to_bits(1.0f)));
  return t * sigmoid_numerator / (1.0f + e);
}

}  // namespace sr3::cpu
