// Adam's update of one parameter as one pass over its elements: minivq.optim.Adam on CuPy arrays,
// launched by adam_cuda.py, instead of the dozen elementwise launches of the array-op version.
// Loaded through CuPy's RawModule (NVRTC), so it includes no headers.
//
// The arithmetic is optim.Adam._update's, operation for operation and in the same order, with the
// host computing the per-step scalars in double precision and rounding them to T as NumPy does:
//
//   g = grad + wd p                                 (only where wd != 0)
//   m = m + (1 - b1) (g - m)                        (m moves towards g)
//   v = v b2 + ((1 - b2) g) g
//   p = p - step_size (m / (sqrt(v) / bias2_root + eps)),   step_size = lr / (1 - b1^t),
//                                                             bias2_root = sqrt(1 - b2^t)
//
// adam_cuda.py compiles it with --fmad=false, so no multiply-add is fused: every operation rounds
// as NumPy's does, and the GPU's step equals the CPU's to the bit.

template <typename T>
__device__ __forceinline__ T square_root(T x);
template <>
__device__ __forceinline__ float square_root<float>(float x) { return sqrtf(x); }
template <>
__device__ __forceinline__ double square_root<double>(double x) { return sqrt(x); }

template <typename T>
__device__ void adam(T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ exp_avg,
                     T* __restrict__ exp_avg_sq, long long n, T one_minus_b1, T b2, T one_minus_b2,
                     T step_size, T bias2_root, T eps, T weight_decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const T p = param[i];
        T g = grad[i];
        if (weight_decay != T(0)) g = g + weight_decay * p;
        const T m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i]);
        const T v = exp_avg_sq[i] * b2 + (one_minus_b2 * g) * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        param[i] = p - step_size * (m / (square_root(v) / bias2_root + eps));
    }
}

// The entry points, one per dtype (adam_cuda.py asks for "adam_" + f32 or f64).
extern "C" __global__ void adam_f32(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, long long n,
                                    float one_minus_b1, float b2, float one_minus_b2, float step_size,
                                    float bias2_root, float eps, float weight_decay) {
    adam<float>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, b2, one_minus_b2, step_size, bias2_root, eps,
                weight_decay);
}
extern "C" __global__ void adam_f64(double* param, const double* grad, double* exp_avg, double* exp_avg_sq,
                                    long long n, double one_minus_b1, double b2, double one_minus_b2,
                                    double step_size, double bias2_root, double eps, double weight_decay) {
    adam<double>(param, grad, exp_avg, exp_avg_sq, n, one_minus_b1, b2, one_minus_b2, step_size, bias2_root, eps,
                 weight_decay);
}
