// The tensor layer of sr3_engine._C: the torch operators
//   sr3_engine_cpp::group_norm_silu(x, num_groups, weight?, bias?, pre_bias?, eps)
//   sr3_engine_cpp::posterior_step(y_t, pred, noise?, seed?, step, state_coef,
//                                  output_coef, coef1, coef2, sigma, clip)
// (math in sr3_kernels.h), their argument checks, and the hand-off to the torch-free kernels.
//
// Every bad argument raises a one-line ValueError that names the operator, before any kernel
// runs. x and y_t must be dense: contiguous (NCHW) or channels_last; the output keeps their
// strides. posterior_step brings pred and noise to y_t's layout (copying only if they differ).
// weight, bias and pre_bias may be any floating dtype; the kernels read them as float32.
// CPU tensors run on at::get_num_threads() OpenMP threads. CUDA tensors run on the current
// stream of their device when the CUDA kernels were built (SR3_ENGINE_WITH_CUDA), and are
// refused with that reason otherwise. Autograd and fake kernels come from sr3_engine/_ext.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "sr3_kernels.h"

#ifdef SR3_ENGINE_WITH_CUDA
// c10's stream and guard only: ATen/cuda/CUDAContext.h would also need the cuBLAS and cuSPARSE headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace {

constexpr const char* kGroupNorm = "sr3_engine_cpp::group_norm_silu: ";
constexpr const char* kPosterior = "sr3_engine_cpp::posterior_step: ";

sr3::DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return sr3::DType::kFloat32;
    case at::kHalf: return sr3::DType::kFloat16;
    case at::kBFloat16: return sr3::DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, name, " has dtype ", t.scalar_type(), "; expected float32, float16 or bfloat16");
  }
}

// True for channels_last, false for contiguous; a tensor that is both (size-1 dims) is read as contiguous.
bool is_channels_last(const at::Tensor& t, const char* op, const char* name) {
  if (t.is_contiguous()) return false;
  TORCH_CHECK_VALUE(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast), op, name,
                    " must be contiguous (NCHW) or channels_last; got sizes ", t.sizes(), " strides ", t.strides());
  return true;
}

void check_device(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                  const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), op, name, " is on ", t.device(), " but ", like_name, " is on ",
                    like.device());
}

void check_cuda_built(const at::Tensor& t, const char* op) {
#ifndef SR3_ENGINE_WITH_CUDA
  TORCH_CHECK_VALUE(!t.is_cuda(), op, "sr3_engine._C was built without its CUDA kernels; the input is on ",
                    t.device());
#else
  (void)t;
  (void)op;
#endif
}

// A float32 contiguous copy (or view) of an optional per-channel parameter of shape `shape`.
at::Tensor float_param(const std::optional<at::Tensor>& param, const at::Tensor& x, at::IntArrayRef shape,
                       const char* name) {
  if (!param.has_value() || !param->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(param->sizes() == shape, kGroupNorm, name, " must have shape ", shape, "; got ",
                    param->sizes());
  TORCH_CHECK_VALUE(param->is_floating_point(), kGroupNorm, name, " has dtype ", param->scalar_type(),
                    "; expected a floating dtype");
  check_device(*param, x, kGroupNorm, name, "x");
  return param->to(at::kFloat).contiguous();
}

const float* float_ptr(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

at::Tensor group_norm_silu(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& pre_bias,
                           double eps) {
  TORCH_CHECK_VALUE(x.dim() == 4, kGroupNorm, "x must be 4-D (B, C, H, W); got shape ", x.sizes());
  check_cuda_built(x, kGroupNorm);
  sr3::GroupNormSiluArgs args;
  args.dtype = dtype_of(x, kGroupNorm, "x");
  args.channels_last = is_channels_last(x, kGroupNorm, "x");
  args.batch = x.size(0);
  args.channels = x.size(1);
  args.spatial = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(num_groups >= 1 && args.channels % num_groups == 0, kGroupNorm, args.channels,
                    " channels are not divisible by num_groups=", num_groups);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, kGroupNorm, "eps must be finite and >= 0; got ", eps);
  args.groups = num_groups;
  args.eps = eps;
  const at::Tensor w = float_param(weight, x, {args.channels}, "weight");
  const at::Tensor b = float_param(bias, x, {args.channels}, "bias");
  const at::Tensor pb = float_param(pre_bias, x, {args.batch, args.channels}, "pre_bias");
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) return out;
  args.x = x.data_ptr();
  args.out = out.data_ptr();
  args.weight = float_ptr(w);
  args.bias = float_ptr(b);
  args.pre_bias = float_ptr(pb);
#ifdef SR3_ENGINE_WITH_CUDA
  if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    int sms = 0;
    const cudaError_t status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device());
    TORCH_CHECK(status == cudaSuccess, kGroupNorm, "cannot query ", x.device(), ": ", cudaGetErrorString(status));
    const auto bytes = static_cast<int64_t>(sr3::group_norm_silu_cuda_workspace(args, sms));
    at::Tensor workspace = at::empty({bytes}, x.options().dtype(at::kByte));
    const char* error = sr3::group_norm_silu_cuda(args, workspace.data_ptr(), sms, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == nullptr, kGroupNorm, "CUDA kernel launch failed: ", error);
    return out;
  }
#endif
  sr3::group_norm_silu_cpu(args, at::get_num_threads());
  return out;
}

at::Tensor posterior_step(const at::Tensor& y_t, const at::Tensor& pred, const std::optional<at::Tensor>& noise,
                          std::optional<int64_t> seed, int64_t step, double state_coef,
                          double output_coef, double coef1, double coef2, double sigma, bool clip) {
  check_cuda_built(y_t, kPosterior);
  sr3::PosteriorStepArgs args;
  args.y_dtype = dtype_of(y_t, kPosterior, "y_t");
  args.pred_dtype = dtype_of(pred, kPosterior, "pred");
  TORCH_CHECK_VALUE(pred.sizes() == y_t.sizes(), kPosterior, "pred has shape ", pred.sizes(), " but y_t has ",
                    y_t.sizes());
  check_device(pred, y_t, kPosterior, "pred", "y_t");
  const bool has_noise = noise.has_value() && noise->defined();
  if (has_noise) {
    args.noise_dtype = dtype_of(*noise, kPosterior, "noise");
    TORCH_CHECK_VALUE(noise->sizes() == y_t.sizes(), kPosterior, "noise has shape ", noise->sizes(),
                      " but y_t has ", y_t.sizes());
    check_device(*noise, y_t, kPosterior, "noise", "y_t");
  }
  TORCH_CHECK_VALUE(!(has_noise && seed.has_value()), kPosterior, "give either noise or seed, not both");
  TORCH_CHECK_VALUE(sigma == 0.0 || has_noise || seed.has_value(), kPosterior, "sigma != 0 needs noise or a seed");
  const auto format = is_channels_last(y_t, kPosterior, "y_t") ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous;
  const at::Tensor e = pred.contiguous(format);
  const at::Tensor z = has_noise && sigma != 0.0 ? noise->contiguous(format) : at::Tensor();
  at::Tensor out = at::empty_like(y_t);
  if (out.numel() == 0) return out;
  args.y_t = y_t.data_ptr();
  args.pred = e.data_ptr();
  args.noise = z.defined() ? z.data_ptr() : nullptr;
  args.out = out.data_ptr();
  args.numel = y_t.numel();
  args.state_coef = static_cast<float>(state_coef);
  args.output_coef = static_cast<float>(output_coef);
  args.coef1 = static_cast<float>(coef1);
  args.coef2 = static_cast<float>(coef2);
  args.sigma = static_cast<float>(sigma);
  args.clip = clip;
  args.noise_mode = sigma == 0.0   ? sr3::NoiseMode::kNone
                    : z.defined() ? sr3::NoiseMode::kGiven
                                  : sr3::NoiseMode::kPhilox;
  args.seed = seed.value_or(0);
  args.step = step;
#ifdef SR3_ENGINE_WITH_CUDA
  if (y_t.is_cuda()) {
    const c10::cuda::CUDAGuard guard(y_t.device());
    const char* error = sr3::posterior_step_cuda(args, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(error == nullptr, kPosterior, "CUDA kernel launch failed: ", error);
    return out;
  }
#endif
  sr3::posterior_step_cpu(args, at::get_num_threads());
  return out;
}

}  // namespace

TORCH_LIBRARY(sr3_engine_cpp, m) {
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, Tensor? pre_bias, float eps)"
        " -> Tensor");
  m.def("posterior_step(Tensor y_t, Tensor pred, Tensor? noise, int? seed, int step, float state_coef,"
        " float output_coef, float coef1, float coef2, float sigma, bool clip) -> Tensor");
}

TORCH_LIBRARY_IMPL(sr3_engine_cpp, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("posterior_step", &posterior_step);
}

// Registered in every build, so that a build without CUDA kernels answers CUDA tensors with its
// one-line reason rather than the dispatcher's missing-kernel report.
TORCH_LIBRARY_IMPL(sr3_engine_cpp, CUDA, m) {
  m.impl("group_norm_silu", &group_norm_silu);
  m.impl("posterior_step", &posterior_step);
}
