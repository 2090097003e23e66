// GroupNorm + SiLU on CUDA (math in sr3_kernels.h) for float32 / float16 / bfloat16 data in NCHW
// or NHWC, statistics accumulated in double. Three launches on the caller's stream:
//
//   1. stats     partial (shifted sum, shifted sum of squares) of slices of the data.
//                NCHW: block (bg, k) reduces slice k of the contiguous run of (batch, group) bg.
//                NHWC: block (b, k) reduces rows chunk k of image b per channel; its threads
//                are (channel lane, row) pairs, a lane 4 channels wide when C % 4 == 0.
//                Slices multiply until the grid has kBlocksPerSm blocks per SM, so batch 1 with
//                few groups still fills the GPU, but never below kMinBlockValues values a block.
//   2. finalize  one block per (batch, group) sums its partials in a fixed order into mean and
//                rstd, and writes per-channel (shift, scale, bias) = (mean - pre_bias, rstd * weight, bias).
//   3. apply     out = silu((x - shift) * scale + bias), four values per thread, with one vector
//                access each way when the layout and alignment allow.
//
// Values are accumulated around a pivot (the group's first value) so the variance does not
// cancel; four values are summed in float, everything beyond in double. No atomics: the same
// input on the same GPU gives the same bits. Workspace: the partials, then the coefficients
// (16 bytes each).
#include <algorithm>

#include "common.cuh"

namespace sr3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 8;
constexpr int64_t kMinBlockValues = 4096;

struct Plan {
  int64_t slices = 1;          // NCHW: per (batch, group); NHWC: row chunks per image
  int64_t rows_per_chunk = 0;  // NHWC
  int64_t partials = 0;
};

Plan make_plan(const GroupNormSiluArgs& a, int multiprocessors) {
  Plan plan;
  const int64_t target = static_cast<int64_t>(kBlocksPerSm) * std::max(multiprocessors, 1);
  if (a.channels_last) {
    const int64_t min_rows = std::max<int64_t>(1, kMinBlockValues / a.channels);
    const int64_t max_chunks = std::max<int64_t>(1, a.spatial / min_rows);
    const int64_t chunks = std::clamp<int64_t>((target + a.batch - 1) / a.batch, 1, max_chunks);
    plan.rows_per_chunk = (a.spatial + chunks - 1) / chunks;
    plan.slices = (a.spatial + plan.rows_per_chunk - 1) / plan.rows_per_chunk;
    plan.partials = a.batch * plan.slices * a.channels;
  } else {
    const int64_t groups = a.batch * a.groups;
    const int64_t max_slices = std::max<int64_t>(1, a.channels / a.groups * a.spatial / kMinBlockValues);
    plan.slices = std::clamp<int64_t>((target + groups - 1) / groups, 1, max_slices);
    plan.partials = groups * plan.slices;
  }
  return plan;
}

__device__ __forceinline__ float pre_bias_at(const GroupNormSiluArgs& a, int64_t b, int64_t c) {
  return a.pre_bias != nullptr ? a.pre_bias[b * a.channels + c] : 0.0f;
}

// x + pre_bias at the group's first channel and position.
template <class Tr>
__device__ __forceinline__ float pivot(const GroupNormSiluArgs& a, int64_t b, int64_t g) {
  const int64_t c = g * (a.channels / a.groups);
  const int64_t index = a.channels_last ? b * a.spatial * a.channels + c : (b * a.channels + c) * a.spatial;
  return Tr::load(static_cast<const typename Tr::Storage*>(a.x)[index]) + pre_bias_at(a, b, c);
}

// kVector: spatial % 4 == 0 and x aligned, so four values share a channel and one load.
template <class Tr, bool kVector>
__global__ void __launch_bounds__(kThreads) stats_nchw(GroupNormSiluArgs a, int64_t slices, double2* partials) {
  __shared__ double shared[64];
  const int64_t bg = blockIdx.x / slices, k = blockIdx.x % slices;
  const int64_t b = bg / a.groups, g = bg % a.groups, per_group = a.channels / a.groups;
  const int64_t values = per_group * a.spatial;
  const auto* x = static_cast<const typename Tr::Storage*>(a.x) + bg * values;
  const float pivot_value = pivot<Tr>(a, b, g);
  // Slice bounds are multiples of 4, so a vector never straddles two slices.
  const int64_t step = ((values + slices - 1) / slices + 3) / 4 * 4;
  const int64_t begin = k * step, end = min64(values, begin + step);
  double sum = 0.0, sumsq = 0.0;
  if constexpr (kVector) {
    for (int64_t i = begin + 4 * threadIdx.x; i < end; i += 4 * blockDim.x) {
      const float offset = pre_bias_at(a, b, g * per_group + i / a.spatial) - pivot_value;
      float v[4];
      load4<Tr>(x + i, v);
      float s = 0.0f, ss = 0.0f;
      for (int j = 0; j < 4; ++j) {
        const float d = v[j] + offset;
        s += d;
        ss += d * d;
      }
      sum += s;
      sumsq += ss;
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      const float d = Tr::load(x[i]) + (pre_bias_at(a, b, g * per_group + i / a.spatial) - pivot_value);
      sum += d;
      sumsq += static_cast<double>(d) * d;
    }
  }
  block_sum(sum, sumsq, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = make_double2(sum, sumsq);
}

// kWidth channels per lane (4 when C % 4 == 0 and x is aligned, else 1).
template <class Tr, int kWidth>
__global__ void __launch_bounds__(kThreads) stats_nhwc(GroupNormSiluArgs a, int64_t chunks, int64_t rows_per_chunk,
                                                       double2* partials) {
  __shared__ double2 shared[kThreads * kWidth];
  const int64_t b = blockIdx.x / chunks, k = blockIdx.x % chunks;
  const int64_t lanes = a.channels / kWidth, per_group = a.channels / a.groups;
  const int lanes_per_pass = static_cast<int>(min64(lanes, blockDim.x));
  const int rows = lanes >= blockDim.x ? 1 : blockDim.x / static_cast<int>(lanes);
  const int lane0 = threadIdx.x % lanes_per_pass, r = threadIdx.x / lanes_per_pass;
  const bool active = r < rows;
  const int64_t first = k * rows_per_chunk, end = min64(a.spatial, first + rows_per_chunk);
  const auto* image = static_cast<const typename Tr::Storage*>(a.x) + b * a.spatial * a.channels;
  double2* out = partials + (b * chunks + k) * a.channels;
  // With rows > 1 every thread runs this loop exactly once (lanes < blockDim), so the barrier is uniform.
  for (int64_t lane = lane0; lane < lanes; lane += lanes_per_pass) {
    const int64_t c0 = lane * kWidth;
    float offset[kWidth];
    double sum[kWidth] = {}, sumsq[kWidth] = {};
    for (int j = 0; j < kWidth; ++j) offset[j] = pre_bias_at(a, b, c0 + j) - pivot<Tr>(a, b, (c0 + j) / per_group);
    for (int64_t p = first + r; active && p < end; p += rows) {
      float v[kWidth];
      if constexpr (kWidth == 4) load4<Tr>(image + p * a.channels + c0, v);
      else v[0] = Tr::load(image[p * a.channels + c0]);
      for (int j = 0; j < kWidth; ++j) {
        const float d = v[j] + offset[j];
        sum[j] += d;
        sumsq[j] += static_cast<double>(d) * d;
      }
    }
    if (rows == 1) {
      for (int j = 0; active && j < kWidth; ++j) out[c0 + j] = make_double2(sum[j], sumsq[j]);
      continue;
    }
    for (int j = 0; j < kWidth; ++j) shared[threadIdx.x * kWidth + j] = make_double2(sum[j], sumsq[j]);
    __syncthreads();
    if (r == 0) {
      for (int j = 0; j < kWidth; ++j) {
        double2 total = make_double2(0.0, 0.0);
        for (int row = 0; row < rows; ++row) {
          const double2 part = shared[(row * lanes_per_pass + lane0) * kWidth + j];
          total.x += part.x;
          total.y += part.y;
        }
        out[c0 + j] = total;
      }
    }
  }
}

template <class Tr>
__global__ void __launch_bounds__(kThreads) finalize(GroupNormSiluArgs a, int64_t slices, const double2* partials,
                                                     float4* coefs) {
  __shared__ double shared[64];
  __shared__ double mean_rstd[2];
  const int64_t bg = blockIdx.x, b = bg / a.groups, g = bg % a.groups, per_group = a.channels / a.groups;
  const int64_t items = a.channels_last ? slices * per_group : slices;
  double sum = 0.0, sumsq = 0.0;
  for (int64_t j = threadIdx.x; j < items; j += blockDim.x) {
    const double2 part = a.channels_last
                             ? partials[(b * slices + j / per_group) * a.channels + g * per_group + j % per_group]
                             : partials[bg * slices + j];
    sum += part.x;
    sumsq += part.y;
  }
  block_sum(sum, sumsq, shared);
  if (threadIdx.x == 0) {
    const double count = static_cast<double>(per_group * a.spatial);
    const double shifted_mean = sum / count;
    const double variance = fmax(sumsq / count - shifted_mean * shifted_mean, 0.0);
    mean_rstd[0] = pivot<Tr>(a, b, g) + shifted_mean;
    mean_rstd[1] = 1.0 / sqrt(variance + a.eps);
  }
  __syncthreads();
  for (int64_t local = threadIdx.x; local < per_group; local += blockDim.x) {
    const int64_t c = g * per_group + local;
    const float weight = a.weight != nullptr ? a.weight[c] : 1.0f;
    coefs[b * a.channels + c] = make_float4(static_cast<float>(mean_rstd[0] - pre_bias_at(a, b, c)),
                                            static_cast<float>(mean_rstd[1] * weight),
                                            a.bias != nullptr ? a.bias[c] : 0.0f, 0.0f);
  }
}

__device__ __forceinline__ float silu(float t) { return t / (1.0f + expf(-t)); }

// kVector: four consecutive values share a channel (NCHW, spatial % 4 == 0) or are four
// consecutive channels (NHWC, C % 4 == 0), and x and out are aligned for one vector access.
template <class Tr, bool kVector>
__global__ void __launch_bounds__(kThreads) apply(GroupNormSiluArgs a, const float4* coefs) {
  const auto* x = static_cast<const typename Tr::Storage*>(a.x);
  auto* out = static_cast<typename Tr::Storage*>(a.out);
  const int64_t total = a.batch * a.channels * a.spatial, image = a.channels * a.spatial;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t per_thread = kVector ? 4 : 1;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q * per_thread < total; q += stride) {
    const int64_t i = q * per_thread;
    if constexpr (kVector) {
      float v[4];
      load4<Tr>(x + i, v);
      for (int j = 0; j < 4; ++j) {
        const int64_t bc = a.channels_last ? i / image * a.channels + (i + j) % a.channels : i / a.spatial;
        const float4 k = coefs[bc];
        v[j] = silu((v[j] - k.x) * k.y + k.z);
      }
      store4<Tr>(out + i, v);
    } else {
      const int64_t bc = a.channels_last ? i / image * a.channels + i % a.channels : i / a.spatial;
      const float4 k = coefs[bc];
      out[i] = Tr::store(silu((Tr::load(x[i]) - k.x) * k.y + k.z));
    }
  }
}

int64_t grid_for(int64_t work, int multiprocessors) {
  return std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, 32LL * std::max(multiprocessors, 1));
}

}  // namespace
}  // namespace sr3::cuda

namespace sr3 {

std::size_t group_norm_silu_cuda_workspace(const GroupNormSiluArgs& args, int multiprocessors) {
  const cuda::Plan plan = cuda::make_plan(args, multiprocessors);
  return static_cast<std::size_t>(plan.partials + args.batch * args.channels) * 16;
}

const char* group_norm_silu_cuda(const GroupNormSiluArgs& args, void* workspace, int multiprocessors,
                                 cudaStream_t stream) {
  using namespace cuda;
  const Plan plan = make_plan(args, multiprocessors);
  auto* partials = static_cast<double2*>(workspace);
  auto* coefs = reinterpret_cast<float4*>(partials + plan.partials);
  const int64_t total = args.batch * args.channels * args.spatial;
  dispatch_dtype(args.dtype, [&](auto traits) {
    using Tr = decltype(traits);
    const std::size_t vector_bytes = 4 * sizeof(typename Tr::Storage);
    const bool x_aligned = aligned(args.x, vector_bytes);
    if (args.channels_last) {
      const int64_t blocks = args.batch * plan.slices;
      if (args.channels % 4 == 0 && x_aligned) {
        stats_nhwc<Tr, 4><<<blocks, kThreads, 0, stream>>>(args, plan.slices, plan.rows_per_chunk, partials);
      } else {
        stats_nhwc<Tr, 1><<<blocks, kThreads, 0, stream>>>(args, plan.slices, plan.rows_per_chunk, partials);
      }
    } else if (args.spatial % 4 == 0 && x_aligned) {
      stats_nchw<Tr, true><<<plan.partials, kThreads, 0, stream>>>(args, plan.slices, partials);
    } else {
      stats_nchw<Tr, false><<<plan.partials, kThreads, 0, stream>>>(args, plan.slices, partials);
    }
    finalize<Tr><<<args.batch * args.groups, kThreads, 0, stream>>>(args, plan.slices, partials, coefs);
    const bool vector = (args.channels_last ? args.channels % 4 == 0 : args.spatial % 4 == 0) && x_aligned &&
                        aligned(args.out, vector_bytes);
    const int64_t apply_blocks = grid_for(vector ? total / 4 : total, multiprocessors);
    if (vector) {
      apply<Tr, true><<<apply_blocks, kThreads, 0, stream>>>(args, coefs);
    } else {
      apply<Tr, false><<<apply_blocks, kThreads, 0, stream>>>(args, coefs);
    }
  });
  return last_error();
}

}  // namespace sr3
