// Fused tile normalisation: uint8 (N, H, W, C) -> (x / 255 - mean) / std as float32 or float16,
// written in NCHW or NHWC, in one pass over the batch.
//
// Why fused: tiles cross PCIe as uint8 (4x less than float32) and become float only here, so the
// conversion, scaling and layout change happen in the one kernel that touches each byte once.
// Host code folds /255, -mean and /std into one scale and one offset per channel, exactly as the
// numpy twin gpubatch.kernels.normalize_tiles does; the multiply and the add are rounded
// separately (__fmul_rn, __fadd_rn, no FMA contraction) so results match the twin bit for bit.
//
// Entry points (extern "C", so CuPy RawModule and nvcc --ptx see plain names):
//   normalize_nchw_f32, normalize_nchw_f16, normalize_nhwc_f32, normalize_nhwc_f16
// Arguments: src, dst, scale[C], offset[C], n, hw (H * W), c.
// Launch: 1-D grid-stride loop over N * H * W * C source elements (reads are coalesced).

#include "half.cuh"

template <typename T, bool NCHW>
__device__ __forceinline__ void gb_normalize(const unsigned char* __restrict__ src,
                                             T* __restrict__ dst,
                                             const float* __restrict__ scale,
                                             const float* __restrict__ offset,
                                             long long n, long long hw, int c)
{
    const long long total = n * hw * (long long)c;
    const long long step = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int ch = (int)(i % c);
        const float v = __fadd_rn(__fmul_rn((float)src[i], scale[ch]), offset[ch]);
        long long o = i;
        if (NCHW) {
            const long long pix = i / c;       // image * hw + pixel
            const long long img = pix / hw;
            const long long p = pix - img * hw;
            o = (img * c + ch) * hw + p;
        }
        dst[o] = gb_from_float<T>(v);
    }
}

#define GB_NORMALIZE_ENTRY(NAME, T, NCHW)                                                   \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ src, T* __restrict__ dst, \
                                    const float* __restrict__ scale,                          \
                                    const float* __restrict__ offset,                         \
                                    long long n, long long hw, int c)                         \
    {                                                                                        \
        gb_normalize<T, NCHW>(src, dst, scale, offset, n, hw, c);                              \
    }

GB_NORMALIZE_ENTRY(normalize_nchw_f32, float, true)
GB_NORMALIZE_ENTRY(normalize_nchw_f16, gb_half_t, true)
GB_NORMALIZE_ENTRY(normalize_nhwc_f32, float, false)
GB_NORMALIZE_ENTRY(normalize_nhwc_f16, gb_half_t, false)
