// posterior_step on CUDA (math in sr3_kernels.h): one pass that reads y_t and pred (and the noise)
// once and writes out once, in float32 whatever the storage types; y_t, pred and noise may each be
// float32, float16 or bfloat16, out has y_t's type. Each thread handles one Philox quad (four
// consecutive elements, philox.h) per grid-stride step, with one vector access per tensor when
// every pointer is aligned for it. Seeded noise is drawn in registers, so no noise tensor exists.
#include <algorithm>

#include "../philox.h"
#include "common.cuh"

namespace sr3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // enough to fill any current GPU; the grid strides beyond

template <class Tr>
__device__ __forceinline__ void load_quad(const void* base, int64_t i, int count, bool vector, float (&v)[4]) {
  const auto* p = static_cast<const typename Tr::Storage*>(base) + i;
  if (vector && count == 4) {
    load4<Tr>(p, v);
    return;
  }
  for (int j = 0; j < count; ++j) v[j] = Tr::load(p[j]);
}

template <class Ty, class Te, class Tn, NoiseMode kNoise>
__global__ void __launch_bounds__(kThreads) posterior_step_kernel(PosteriorStepArgs a, bool vector) {
  const int64_t quads = (a.numel + 3) / 4;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < quads;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = 4 * q;
    const int count = static_cast<int>(min64(4, a.numel - i));
    float y[4] = {}, e[4] = {}, z[4] = {};
    load_quad<Ty>(a.y_t, i, count, vector, y);
    load_quad<Te>(a.pred, i, count, vector, e);
    if constexpr (kNoise == NoiseMode::kGiven) load_quad<Tn>(a.noise, i, count, vector, z);
    if constexpr (kNoise == NoiseMode::kPhilox) philox_normal4(a.seed, a.step, q, z);
    float r[4];
    for (int j = 0; j < 4; ++j) {
      float y0 = y[j] * a.state_coef - e[j] * a.output_coef;
      // Comparisons rather than fminf/fmaxf, which would turn NaN into a bound and hide it from
      // the sampler's NaN check.
      if (a.clip) y0 = y0 < -1.0f ? -1.0f : (y0 > 1.0f ? 1.0f : y0);
      r[j] = a.coef1 * y0 + a.coef2 * y[j];
      if constexpr (kNoise != NoiseMode::kNone) r[j] += a.sigma * z[j];
    }
    auto* out = static_cast<typename Ty::Storage*>(a.out) + i;
    if (vector && count == 4) {
      store4<Ty>(out, r);
    } else {
      for (int j = 0; j < count; ++j) out[j] = Ty::store(r[j]);
    }
  }
}

template <class Ty, class Te, class Tn, NoiseMode kNoise>
void launch(const PosteriorStepArgs& a, bool vector, cudaStream_t stream) {
  const int64_t quads = (a.numel + 3) / 4;
  const int64_t blocks = std::clamp<int64_t>((quads + kThreads - 1) / kThreads, 1, kMaxBlocks);
  posterior_step_kernel<Ty, Te, Tn, kNoise><<<blocks, kThreads, 0, stream>>>(a, vector);
}

}  // namespace
}  // namespace sr3::cuda

namespace sr3 {

const char* posterior_step_cuda(const PosteriorStepArgs& args, cudaStream_t stream) {
  using namespace cuda;
  dispatch_dtype(args.y_dtype, [&](auto y_traits) {
    dispatch_dtype(args.pred_dtype, [&](auto pred_traits) {
      using Ty = decltype(y_traits);
      using Te = decltype(pred_traits);
      bool vector = aligned(args.y_t, 4 * sizeof(typename Ty::Storage)) &&
                    aligned(args.out, 4 * sizeof(typename Ty::Storage)) &&
                    aligned(args.pred, 4 * sizeof(typename Te::Storage));
      switch (args.noise_mode) {
        case NoiseMode::kNone:
          launch<Ty, Te, Float32, NoiseMode::kNone>(args, vector, stream);
          return;
        case NoiseMode::kPhilox:
          launch<Ty, Te, Float32, NoiseMode::kPhilox>(args, vector, stream);
          return;
        case NoiseMode::kGiven:
          dispatch_dtype(args.noise_dtype, [&](auto noise_traits) {
            using Tn = decltype(noise_traits);
            vector = vector && aligned(args.noise, 4 * sizeof(typename Tn::Storage));
            launch<Ty, Te, Tn, NoiseMode::kGiven>(args, vector, stream);
          });
          return;
      }
    });
  });
  return last_error();
}

}  // namespace sr3
