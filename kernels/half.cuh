// Shared by the kernels: half-precision conversion and float -> T stores.
#pragma once

// Half precision: <cuda_fp16.h> by default. Some NVRTC setups (CuPy wheels without a matching
// toolkit) cannot compile that header; the loader then retries with -DGPUBATCH_NO_FP16_HEADER,
// which stores raw binary16 bits converted by the same round-to-nearest-even instruction.
#ifndef GPUBATCH_NO_FP16_HEADER
#include <cuda_fp16.h>
typedef __half gb_half_t;
__device__ __forceinline__ gb_half_t gb_to_half(float v) { return __float2half_rn(v); }
#else
typedef unsigned short gb_half_t;
__device__ __forceinline__ gb_half_t gb_to_half(float v)
{
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif

template <typename T>
__device__ __forceinline__ T gb_from_float(float v);

template <>
__device__ __forceinline__ float gb_from_float<float>(float v) { return v; }

template <>
__device__ __forceinline__ gb_half_t gb_from_float<gb_half_t>(float v) { return gb_to_half(v); }
