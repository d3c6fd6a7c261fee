// The window copies of a convolution on a GPU, one launch each: im2col and col2im on channels-last
// images (the reference is windows_numpy.py; windows_cuda.py launches these). Loaded through CuPy's
// RawModule (NVRTC), so it includes no headers.
//
// An image is (n, h, w, c) with any element strides (si_n, si_h, si_w, si_c): im2col reads an NCHW
// tensor through its NHWC view directly, with no copy first. The columns are one contiguous
// (n*oh*ow, kh*kw*c) matrix, row (b, i, j), column (p, q, ch):
//
//   im2col:  cols[(b, i, j), (p, q, ch)] = image[b, i*sh - ph + p, j*sw - pw + q, ch]   (0 outside)
//   col2im:  image[b, y, x, ch] = sum over the windows (i, j) that cover (y, x) of cols[(b, i, j), (p, q, ch)]
//
// col2im gathers: one thread per image element sums its own taps in the order (p, q) that
// windows_numpy.py adds them, so the result is the reference's to the bit, with no atomics.
// Every loop is grid-strided; indices are 64-bit (a batch of windows passes 2**31 elements easily).

template <typename T>
__device__ void im2col(const T* __restrict__ image, T* __restrict__ cols, long long total,
                       int h, int w, int c, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow,
                       long long si_n, long long si_h, long long si_w, long long si_c) {
    const long long width = (long long)kh * kw * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long row = e / width;
        const int col = (int)(e - row * width);
        const int ch = col % c, q = (col / c) % kw, p = col / (c * kw);
        const int j = (int)(row % ow);
        const long long bi = row / ow;
        const int i = (int)(bi % oh);
        const long long b = bi / oh;
        const int y = i * sh - ph + p, x = j * sw - pw + q;
        cols[e] = (y >= 0 && y < h && x >= 0 && x < w) ? image[b * si_n + y * si_h + x * si_w + ch * si_c] : T(0);
    }
}

template <typename T>
__device__ void col2im(const T* __restrict__ cols, T* __restrict__ out, long long total,
                       int h, int w, int c, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow,
                       long long so_n, long long so_h, long long so_w, long long so_c) {
    const long long width = (long long)kh * kw * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int ch = (int)(e % c);
        long long r = e / c;
        const int x = (int)(r % w);
        r /= w;
        const int y = (int)(r % h);
        const long long b = r / h;
        T acc = T(0);
        for (int p = 0; p < kh; ++p) {
            const int yy = y + ph - p;              // = i * sh for the window row i that holds tap p here
            if (yy < 0 || yy % sh != 0 || yy / sh >= oh) continue;
            const int i = yy / sh;
            for (int q = 0; q < kw; ++q) {
                const int xx = x + pw - q;
                if (xx < 0 || xx % sw != 0 || xx / sw >= ow) continue;
                const int j = xx / sw;
                acc += cols[((b * oh + i) * ow + j) * width + (long long)(p * kw + q) * c + ch];
            }
        }
        out[b * so_n + y * so_h + x * so_w + ch * so_c] = acc;
    }
}

// The entry points, one per dtype (windows_cuda.py asks for "im2col_" / "col2im_" + f32 or f64).
#define IM2COL_ARGS int h, int w, int c, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow, \
                    long long s_n, long long s_h, long long s_w, long long s_c
#define GEOMETRY h, w, c, kh, kw, sh, sw, ph, pw, oh, ow, s_n, s_h, s_w, s_c

extern "C" __global__ void im2col_f32(const float* image, float* cols, long long total, IM2COL_ARGS) {
    im2col<float>(image, cols, total, GEOMETRY);
}
extern "C" __global__ void im2col_f64(const double* image, double* cols, long long total, IM2COL_ARGS) {
    im2col<double>(image, cols, total, GEOMETRY);
}
extern "C" __global__ void col2im_f32(const float* cols, float* out, long long total, IM2COL_ARGS) {
    col2im<float>(cols, out, total, GEOMETRY);
}
extern "C" __global__ void col2im_f64(const double* cols, double* out, long long total, IM2COL_ARGS) {
    col2im<double>(cols, out, total, GEOMETRY);
}
