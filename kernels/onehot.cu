// One-hot DNA encoding: uint8 codes (N, L), A=0 C=1 G=2 T=3, anything else N -> float32 or float16
// in (N, L, 4) "NLC" or (N, 4, L) "NCL" layout; N positions hold n_value in all four channels.
// With rc != 0 the window is reverse-complemented on the fly (position l reads L-1-l, and the base
// is complemented: A<->T, C<->G, N stays N), so the reverse strand never exists as its own array.
//
// Why on the device: windows cross PCIe as one byte per base instead of 16 (four float32s), and
// the reverse complement costs no extra pass. Matches gpubatch.kernels.one_hot exactly.
//
// Entry points: onehot_nlc_f32, onehot_nlc_f16, onehot_ncl_f32, onehot_ncl_f16
// Arguments: codes, dst, n, length, n_value, rc.
// Launch: 1-D grid-stride loop over N * L positions; each thread writes that position's 4 values.

#include "half.cuh"

template <typename T, bool NCL>
__device__ __forceinline__ void gb_onehot(const unsigned char* __restrict__ codes,
                                          T* __restrict__ dst, long long n, long long length,
                                          float n_value, int rc)
{
    const long long total = n * length;
    const long long step = (long long)blockDim.x * gridDim.x;
    const T one = gb_from_float<T>(1.0f);
    const T zero = gb_from_float<T>(0.0f);
    const T nv = gb_from_float<T>(n_value);
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const long long row = i / length;
        const long long l = i - row * length;
        unsigned int code = rc ? codes[row * length + (length - 1 - l)] : codes[i];
        if (code > 4u) code = 4u;
        if (rc && code < 4u) code = 3u - code;
        for (int k = 0; k < 4; ++k) {
            const T v = (code == 4u) ? nv : ((code == (unsigned int)k) ? one : zero);
            const long long o = NCL ? (row * 4 + k) * length + l : i * 4 + k;
            dst[o] = v;
        }
    }
}

#define GB_ONEHOT_ENTRY(NAME, T, NCL)                                                      \
    extern "C" __global__ void NAME(const unsigned char* __restrict__ codes,                \
                                    T* __restrict__ dst, long long n, long long length,      \
                                    float n_value, int rc)                                  \
    {                                                                                       \
        gb_onehot<T, NCL>(codes, dst, n, length, n_value, rc);                              \
    }

GB_ONEHOT_ENTRY(onehot_nlc_f32, float, false)
GB_ONEHOT_ENTRY(onehot_nlc_f16, gb_half_t, false)
GB_ONEHOT_ENTRY(onehot_ncl_f32, float, true)
GB_ONEHOT_ENTRY(onehot_ncl_f16, gb_half_t, true)
