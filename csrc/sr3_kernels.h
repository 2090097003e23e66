// The torch-free interface between the tensor layer (ops.cpp) and the kernels of sr3_engine._C.
//
// Kernels see raw pointers, sizes and a dtype tag only, so the CPU files compile without
// torch and the CUDA files with nothing but nvcc (`make check-cuda`). ops.cpp validates every
// argument before a kernel runs; the kernels assume what is documented here.
//
// group_norm_silu:  v = x + pre_bias[b, c]
//                   out = silu((v - mean_bg) / sqrt(var_bg + eps) * weight[c] + bias[c])
//   mean and biased variance per (batch, group) over C / groups channels x spatial positions,
//   accumulated in double around a pivot (the group's first value), so fp32 statistics are exact
//   to fp32 rounding whatever the data's offset. x and out are dense, NCHW or NHWC (channels_last).
//
// posterior_step:   y0  = y_t * state_coef - pred * output_coef   (clamped to [-1, 1] if clip)
//                   out = coef1 * y0 + coef2 * y_t + sigma * z
//   pred is the network's output, whatever it estimates (eps, y0 or v): state_coef and
//   output_coef turn it into y0 (diffusion.py's table), so one kernel serves every target.
//   in float32; z is read from `noise`, drawn from Philox (philox.h) for (seed, step, element), or
//   absent. All tensors are dense in the same memory order; element i is the i-th in memory.
#pragma once

#include <cstddef>
#include <cstdint>

// Same declaration as CUDA's driver_types.h, so this header needs no CUDA include.
typedef struct CUstream_st* cudaStream_t;

namespace sr3 {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GroupNormSiluArgs {
  const void* x = nullptr;           // batch x channels x spatial, `dtype`
  void* out = nullptr;               // same shape, layout and dtype as x
  const float* weight = nullptr;     // channels, or nullptr for ones
  const float* bias = nullptr;       // channels, or nullptr for zeros
  const float* pre_bias = nullptr;   // batch x channels, or nullptr for zeros
  int64_t batch = 0, channels = 0, spatial = 0, groups = 1;
  double eps = 1e-5;
  DType dtype = DType::kFloat32;
  bool channels_last = false;        // NHWC: channel is the fastest index
};

enum class NoiseMode : int { kNone = 0, kGiven = 1, kPhilox = 2 };

struct PosteriorStepArgs {
  const void* y_t = nullptr;
  const void* pred = nullptr;
  const void* noise = nullptr;       // read only when noise_mode == kGiven
  void* out = nullptr;               // y_dtype
  DType y_dtype = DType::kFloat32, pred_dtype = DType::kFloat32, noise_dtype = DType::kFloat32;
  int64_t numel = 0;
  float state_coef = 0.f, output_coef = 0.f, coef1 = 0.f, coef2 = 0.f, sigma = 0.f;
  bool clip = true;
  NoiseMode noise_mode = NoiseMode::kNone;
  int64_t seed = 0, step = 0;        // used when noise_mode == kPhilox
};

// How the CPU kernels write bfloat16 (group_norm_silu's output). kGeneric rounds in integer
// arithmetic (cpu/dtype.h); kAvx512Bf16 with the CPU's conversion instructions (VCVTNE2PS2BF16,
// AVX-512 BF16). Both round to nearest even; the instruction also flushes float32 subnormals to
// zero and keeps a NaN's payload (quieted) where kGeneric writes one canonical NaN.
enum class Bf16Path : int { kGeneric = 0, kAvx512Bf16 = 1 };

// The path the CPU kernels take: kAvx512Bf16 where the CPU has AVX-512 BF16 (cpuid), unless forced.
Bf16Path bf16_path();
bool cpu_supports_bf16_path(Bf16Path path);
// Forces `path` on every later kernel call (path < 0: the CPU's choice again); false, changing
// nothing, for a path this CPU does not support. For tests and benchmarks.
bool force_bf16_path(int path);

// CPU kernels (OpenMP with `num_threads` threads). Results do not depend on num_threads: the
// reductions are cut into pieces fixed by the shape alone and summed in a fixed order.
void group_norm_silu_cpu(const GroupNormSiluArgs& args, int num_threads);
void posterior_step_cpu(const PosteriorStepArgs& args, int num_threads);

// CUDA kernels, asynchronous on `stream`. They return nullptr on success, else the CUDA error
// string. group_norm_silu needs a device workspace of group_norm_silu_cuda_workspace() bytes
// (16-byte aligned); `multiprocessors` sizes the split of each reduction across blocks.
std::size_t group_norm_silu_cuda_workspace(const GroupNormSiluArgs& args, int multiprocessors);
const char* group_norm_silu_cuda(const GroupNormSiluArgs& args, void* workspace, int multiprocessors,
                                 cudaStream_t stream);
const char* posterior_step_cuda(const PosteriorStepArgs& args, cudaStream_t stream);

}  // namespace sr3
