// Writing float32 values as bfloat16 on the CPU, on the path this CPU supports (sr3_kernels.h:
// Bf16Path). The AVX-512 BF16 path is compiled here whatever the build's -march, through a
// function target attribute, and taken only where cpuid reports the instructions (and the OS
// saves the AVX-512 registers), so one build serves CPUs with and without them.
#include <atomic>

#include "dtype.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define SR3_HAVE_AVX512BF16_PATH 1
#include <immintrin.h>
#endif

namespace sr3 {
namespace {

// -1: not forced, else a Bf16Path. Set only by tests and benchmarks (force_bf16_path).
std::atomic<int> forced{-1};

#ifdef SR3_HAVE_AVX512BF16_PATH
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))
void store_avx512bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i, reinterpret_cast<__m512i>(pair));
  }
  for (; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m256bh half = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + i));
    _mm256_mask_storeu_epi16(dst + i, mask, reinterpret_cast<__m256i>(half));
  }
}

bool cpu_has_avx512bf16() {
  // GCC's and Clang's checks include the OS's support for the AVX-512 state (XCR0).
  static const bool has = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}
#else
bool cpu_has_avx512bf16() { return false; }
#endif

}  // namespace

bool cpu_supports_bf16_path(Bf16Path path) { return path == Bf16Path::kGeneric || cpu_has_avx512bf16(); }

Bf16Path bf16_path() {
  const int chosen = forced.load(std::memory_order_relaxed);
  if (chosen >= 0) return static_cast<Bf16Path>(chosen);
  return cpu_has_avx512bf16() ? Bf16Path::kAvx512Bf16 : Bf16Path::kGeneric;
}

bool force_bf16_path(int path) {
  if (path >= 0 && !cpu_supports_bf16_path(static_cast<Bf16Path>(path))) return false;
  forced.store(path < 0 ? -1 : path, std::memory_order_relaxed);
  return true;
}

namespace cpu {

void store_bf16(Bf16Path path, const float* src, uint16_t* dst, int64_t n) {
#ifdef SR3_HAVE_AVX512BF16_PATH
  if (path == Bf16Path::kAvx512Bf16) {
    store_avx512bf16(src, dst, n);
    return;
  }
#else
  (void)path;
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = BFloat16::store(src[i]);
}

}  // namespace cpu
}  // namespace sr3
