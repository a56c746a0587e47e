// Per-tile tissue fraction on a thumbnail mask: uint8 mask (H, W), nonzero = tissue; boxes int32
// (K, 4) as x0, y0, x1, y1 in mask pixels -> float32 (K,) fraction of tissue pixels in each box.
//
// Box semantics follow gpubatch.kernels.tissue_fraction exactly: x0, y0 are clipped to the mask,
// x1, y1 are raised to at least x0 + 1, y0 + 1 (a box is at least one pixel wide and high) and then
// clipped; an empty clipped box (outside the mask) has fraction 0. The ratio is taken in double
// and rounded once to float, which equals float32(numpy's float64 result).
//
// Why a kernel: on a GPU run the mask is already on the device (thresholded there), and tens of
// thousands of candidate tiles are filtered in one launch instead of a host round trip.
//
// Entry point: tissue_fraction(mask, h, w, boxes, k, out)
// Launch: one block per box (grid = K), any power-of-two block size up to 1024 (256 is good).

extern "C" __global__ void tissue_fraction(const unsigned char* __restrict__ mask, int h, int w,
                                           const int* __restrict__ boxes, int k,
                                           float* __restrict__ out)
{
    const int b = blockIdx.x;
    if (b >= k) return;
    const int x0 = min(max(boxes[4 * b + 0], 0), w);
    const int y0 = min(max(boxes[4 * b + 1], 0), h);
    const int x1 = min(max(max(boxes[4 * b + 2], x0 + 1), 0), w);
    const int y1 = min(max(max(boxes[4 * b + 3], y0 + 1), 0), h);
    const long long bw = (long long)(x1 - x0);
    const long long area = bw * (long long)(y1 - y0);

    unsigned long long count = 0;
    for (long long i = threadIdx.x; i < area; i += blockDim.x) {
        const long long yy = y0 + i / bw;
        const long long xx = x0 + i % bw;
        count += (mask[yy * (long long)w + xx] != 0) ? 1ull : 0ull;
    }
    // warp reduction, then one shared slot per warp
    for (int off = 16; off > 0; off >>= 1) count += __shfl_down_sync(0xffffffffu, count, off);
    __shared__ unsigned long long partial[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = count;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        count = (lane < nwarps) ? partial[lane] : 0ull;
        for (int off = 16; off > 0; off >>= 1) count += __shfl_down_sync(0xffffffffu, count, off);
        if (lane == 0) {
            const long long denom = area > 0 ? area : 1;
            out[b] = (float)((double)count / (double)denom);
        }
    }
}
