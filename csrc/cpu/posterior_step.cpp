// posterior_step on the CPU (math in sr3_kernels.h): one pass that reads y_t and pred (and the
// noise) once and writes out once, in float32 whatever the storage types. y_t, pred and noise
// may each be float32, float16 or bfloat16; out has y_t's type. Elements are cut into chunks
// of whole Philox quads fixed by the size alone, so the thread count never changes the result.
// Drawing the noise (Box-Muller: log, sin, cos per pair) is scalar; the given-noise and
// no-noise paths vectorise.
#include <algorithm>

#include "../philox.h"
#include "dtype.h"

namespace sr3::cpu {
namespace {

constexpr int64_t kChunk = 1 << 16;      // a multiple of 4: chunks hold whole Philox quads
constexpr int64_t kMinParallel = 1 << 16;

using RangeFn = void (*)(const PosteriorStepArgs&, int64_t, int64_t);

template <class Ty, class Te>
inline float deterministic_part(const PosteriorStepArgs& a, typename Ty::Storage y_t, typename Te::Storage pred) {
  const float y = Ty::load(y_t);
  float y0 = y * a.state_coef - Te::load(pred) * a.output_coef;
  if (a.clip) y0 = std::min(std::max(y0, -1.0f), 1.0f);
  return a.coef1 * y0 + a.coef2 * y;
}

template <class Ty, class Te, class Tn, bool kWithNoise>
void step_range(const PosteriorStepArgs& args, int64_t begin, int64_t end) {
  // A local copy cannot alias `out`, so its scalars stay in registers across the vector loop.
  const PosteriorStepArgs a = args;
  const auto* __restrict y = static_cast<const typename Ty::Storage*>(a.y_t);
  const auto* __restrict e = static_cast<const typename Te::Storage*>(a.pred);
  const auto* __restrict z = static_cast<const typename Tn::Storage*>(a.noise);
  auto* __restrict out = static_cast<typename Ty::Storage*>(a.out);
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    float r = deterministic_part<Ty, Te>(a, y[i], e[i]);
    if constexpr (kWithNoise) r += a.sigma * Tn::load(z[i]);
    out[i] = Ty::store(r);
  }
}

template <class Ty, class Te>
void philox_range(const PosteriorStepArgs& a, int64_t begin, int64_t end) {
  const auto* y = static_cast<const typename Ty::Storage*>(a.y_t);
  const auto* e = static_cast<const typename Te::Storage*>(a.pred);
  auto* out = static_cast<typename Ty::Storage*>(a.out);
  for (int64_t quad = begin / 4; quad * 4 < end; ++quad) {
    float z[4];
    philox_normal4(a.seed, a.step, quad, z);
    for (int64_t i = quad * 4; i < std::min(end, quad * 4 + 4); ++i) {
      out[i] = Ty::store(deterministic_part<Ty, Te>(a, y[i], e[i]) + a.sigma * z[i - quad * 4]);
    }
  }
}

void run_chunks(const PosteriorStepArgs& a, int threads, RangeFn range) {
  const int64_t chunks = (a.numel + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && a.numel >= kMinParallel)
  for (int64_t k = 0; k < chunks; ++k) range(a, k * kChunk, std::min(a.numel, (k + 1) * kChunk));
}

}  // namespace
}  // namespace sr3::cpu

namespace sr3 {

void posterior_step_cpu(const PosteriorStepArgs& args, int num_threads) {
  const int threads = std::max(1, num_threads);
  cpu::dispatch_dtype(args.y_dtype, [&](auto y_traits) {
    cpu::dispatch_dtype(args.pred_dtype, [&](auto pred_traits) {
      using Ty = decltype(y_traits);
      using Te = decltype(pred_traits);
      switch (args.noise_mode) {
        case NoiseMode::kNone:
          cpu::run_chunks(args, threads, cpu::step_range<Ty, Te, cpu::Float32, false>);
          return;
        case NoiseMode::kPhilox:
          cpu::run_chunks(args, threads, cpu::philox_range<Ty, Te>);
          return;
        case NoiseMode::kGiven:
          cpu::dispatch_dtype(args.noise_dtype, [&](auto noise_traits) {
            cpu::run_chunks(args, threads, cpu::step_range<Ty, Te, decltype(noise_traits), true>);
          });
          return;
      }
    });
  });
}

}  // namespace sr3
