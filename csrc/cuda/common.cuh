// Shared pieces of the CUDA kernels: element types, 4-wide loads and stores, a deterministic
// block reduction, and the dtype dispatch. Plain CUDA (no torch), so `nvcc -c` checks it alone.
//
// Loads and stores of four consecutive elements use one 16-byte (float) or 8-byte (half,
// bfloat16) access; callers take that path only when the pointers are aligned to it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../sr3_kernels.h"

namespace sr3::cuda {

struct Float32 {
  using Storage = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

struct Float16 {
  using Storage = __half;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

struct BFloat16 {
  using Storage = __nv_bfloat16;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Calls f(Float32{}), f(Float16{}) or f(BFloat16{}) for `dtype`.
template <class F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(Float32{}); return;
    case DType::kFloat16: f(Float16{}); return;
    case DType::kBFloat16: f(BFloat16{}); return;
  }
}

template <class Tr>
__device__ __forceinline__ void load4(const typename Tr::Storage* p, float (&v)[4]) {
  using T = typename Tr::Storage;
  if constexpr (sizeof(T) == 4) {
    const float4 q = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else {
    const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
    T parts[4];
    memcpy(parts, &q, sizeof(q));
    for (int j = 0; j < 4; ++j) v[j] = Tr::load(parts[j]);
  }
}

template <class Tr>
__device__ __forceinline__ void store4(typename Tr::Storage* p, const float (&v)[4]) {
  using T = typename Tr::Storage;
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    T parts[4];
    for (int j = 0; j < 4; ++j) parts[j] = Tr::store(v[j]);
    uint2 q;
    memcpy(&q, parts, sizeof(q));
    *reinterpret_cast<uint2*>(p) = q;
  }
}

// std::min is host-only in device code without --expt-relaxed-constexpr.
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// Sum of (a, b) over the block, valid in thread 0. The order is fixed by the block size alone,
// so repeated runs give the same bits. `shared` holds 2 * 32 doubles.
__device__ __forceinline__ void block_sum(double& a, double& b, double* shared) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(0xFFFFFFFFu, a, offset);
    b += __shfl_down_sync(0xFFFFFFFFu, b, offset);
  }
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? shared[lane] : 0.0;
    b = lane < warps ? shared[32 + lane] : 0.0;
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xFFFFFFFFu, a, offset);
      b += __shfl_down_sync(0xFFFFFFFFu, b, offset);
    }
  }
}

inline const char* last_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace sr3::cuda
