// nearest_code.cu: the fused nearest-codebook search of minivq on CUDA.
//
// Loaded by nearest_cuda.py through CuPy's RawModule (NVRTC), so it includes no headers.
// For every row x_i of x (N, D) it finds argmin_k ||e_k||^2 - 2 x_i.e_k over the codebook
// (K, D), ties to the lowest k, without writing the N x K score matrix to device memory.
// (||x_i||^2 is the same for every code of a row, so it is left out of the score.)
// The maximum-inner-product search (metric "ip" in nearest_cuda.py) is this same kernel given
// norms of zero: the score -2 x_i.e_k is smallest where x_i.e_k is largest (the -2 is exact).
//
// nearest_code_{f32,f64}: one block of 256 threads, seen as a 16 x 16 grid (tx = tid % 16,
// ty = tid / 16), owns BM = 16*TM rows of x and sweeps the codebook BN = 16*TN codes at a time.
//   - Each thread accumulates TM rows x TN codes of dot products in registers. Its rows are two
//     runs of TM/2 that sit BM/2 apart (its codes likewise, BN/2 apart), so that the threads of
//     a warp read contiguous 16-byte vectors from shared memory, without bank conflicts.
//   - D is consumed BK at a time. A slice of x (BM x BK) and of the codebook (BN x BK) is copied
//     to shared memory transposed, [k][row] and [k][code], so the inner loop reads a column of
//     each. Two shared buffers: the copies of the next slice (cp.async from sm_80 on, so they
//     take no registers) are in flight while the current one is multiplied; one __syncthreads
//     per slice. Rows past N, codes past K and columns past D arrive as zeros (cp.async
//     zero-fill), so any N, K, D work without special cases.
//   - After the last slice of a code tile, score = fma(-2, x.e, ||e||^2) (exact scaling, one
//     rounding) and each thread keeps, per row, the best (score, index) pair it has seen.
//     Pairs are compared lexicographically, so ties go to the lower index whatever the order.
//   - At the end the 16 threads that share a row (a half warp) reduce their pairs with
//     __shfl_xor_sync. With the codebook split over gridDim.y (small N), each split writes its
//     pair to part_score/part_index and reduce_splits_* picks the winner, again lexicographically.
// Every score is the same sequence of fused multiply-adds over d, in the same order, whatever
// tile, thread or register holds it, so identical codes get bitwise-identical scores: the
// lowest-index rule is exact for duplicated codes.
//
// code_norms_{f32,f64}: ||e_k||^2, one thread per code, a plain fma loop over d (deterministic).
//
// Geometry used by nearest_cuda.py (keep in sync with the wrappers at the bottom):
//   float:  TM = 8, TN = 8, BK = 8  -> BM = 128 rows, BN = 128 codes, 16.9 KB of shared memory
//   double: TM = 4, TN = 4, BK = 16 -> BM =  64 rows, BN =  64 codes, 33.8 KB of shared memory
// Both stay within 128 registers without spilling (ptxas -v, sm_90), so two blocks (16 warps)
// fit on an SM; the test tests/test_cuda_compile.py holds that.

#define MINIVQ_THREADS 256
#define MINIVQ_INT_MAX 0x7fffffff

template <typename T> struct Limits;
template <> struct Limits<float> {
    __device__ static __forceinline__ float inf() { return __int_as_float(0x7f800000); }
};
template <> struct Limits<double> {
    __device__ static __forceinline__ double inf() { return __longlong_as_double(0x7ff0000000000000LL); }
};

// Explicitly rounded fused multiply-add: never split or re-contracted by the compiler.
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// (score, index) order: the lower score, and on equal scores the lower index.
template <typename T>
__device__ __forceinline__ bool better(T score, int index, T best_score, int best_index) {
    return score < best_score || (score == best_score && index < best_index);
}

// W consecutive elements from 16-byte aligned shared memory into registers, as 16-byte loads.
template <typename T, int W> struct SharedVector;
template <> struct SharedVector<float, 4> {
    __device__ static __forceinline__ void load(float (&dst)[4], const float* src) {
        const float4 v = *reinterpret_cast<const float4*>(src);
        dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; dst[3] = v.w;
    }
};
template <> struct SharedVector<double, 2> {
    __device__ static __forceinline__ void load(double (&dst)[2], const double* src) {
        const double2 v = *reinterpret_cast<const double2*>(src);
        dst[0] = v.x; dst[1] = v.y;
    }
};
template <> struct SharedVector<double, 4> {
    __device__ static __forceinline__ void load(double (&dst)[4], const double* src) {
        const double2 v0 = reinterpret_cast<const double2*>(src)[0];
        const double2 v1 = reinterpret_cast<const double2*>(src)[1];
        dst[0] = v0.x; dst[1] = v0.y; dst[2] = v1.x; dst[3] = v1.y;
    }
};

// One element global -> shared. From sm_80 on an asynchronous copy (cp.async, which zero-fills when
// `ok` is false, so out-of-range rows, codes and columns cost no branch); before that a plain load.
template <typename T>
__device__ __forceinline__ void copy_async(T* shared_dst, const T* global_src, bool ok) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned dst;   // the shared-window address of shared_dst (inline PTX: NVRTC has no headers)
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(dst) : "l"(shared_dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n"
                 :: "r"(dst), "l"(global_src), "n"((int)sizeof(T)), "r"(ok ? (int)sizeof(T) : 0));
#else
    *shared_dst = ok ? *global_src : T(0);
#endif
}

// Wait until this thread's copies have landed (a __syncthreads must follow before others read them).
__device__ __forceinline__ void copy_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <typename T, int TM, int TN, int BK>
__device__ __forceinline__ void nearest_code_body(
    const T* __restrict__ x, const T* __restrict__ codebook, const T* __restrict__ norms,
    int n, int k, int d, int tiles_per_split,
    long long* __restrict__ out, T* __restrict__ part_score, int* __restrict__ part_index)
{
    constexpr int BM = 16 * TM, BN = 16 * TN;       // rows and codes of a block tile
    constexpr int HM = TM / 2, HN = TN / 2;         // a thread's rows (codes) come in two runs
    constexpr int PAD = 16 / sizeof(T);             // keeps every shared row 16-byte aligned
    constexpr int X_LOADS = BM * BK / MINIVQ_THREADS;
    constexpr int E_LOADS = BN * BK / MINIVQ_THREADS;
    static_assert(X_LOADS * MINIVQ_THREADS == BM * BK && E_LOADS * MINIVQ_THREADS == BN * BK,
                  "a slice must split evenly over the threads");
    static_assert(MINIVQ_THREADS % BK == 0, "consecutive threads load consecutive columns");

    __shared__ __align__(16) T xs[2][BK][BM + PAD];   // slice of x, transposed: xs[buf][k][row]
    __shared__ __align__(16) T es[2][BK][BN + PAD];   // slice of the codebook: es[buf][k][code]

    const int tid = threadIdx.x;
    const int tx = tid % 16, ty = tid / 16;
    const long long row0 = (long long)blockIdx.x * BM;
    const int num_tiles = (k + BN - 1) / BN;
    const int tile_begin = blockIdx.y * tiles_per_split;
    const int tile_end = num_tiles < tile_begin + tiles_per_split ? num_tiles : tile_begin + tiles_per_split;
    const int chunks = d > 0 ? (d + BK - 1) / BK : 1;
    const int stages = (tile_end - tile_begin) * chunks;   // (code tile, slice of D) pairs

    // Slice `stage` into shared buffer `buf`. Element l of a slice is (row or code l / BK, column
    // l % BK), so consecutive threads read consecutive columns of a row; each thread always handles
    // the same column and rows (codes) own, own + STEP, own + 2 STEP, ...
    constexpr int STEP = MINIVQ_THREADS / BK;
    const int own = tid / BK, col_own = tid % BK;
    auto issue = [&](int stage, int buf) {
        const int code0 = (tile_begin + stage / chunks) * BN;
        const int col = (stage % chunks) * BK + col_own;
        const bool col_ok = col < d;
#pragma unroll
        for (int r = 0; r < X_LOADS; ++r) {
            const long long row = row0 + own + r * STEP;
            const bool ok = col_ok && row < n;
            copy_async(&xs[buf][col_own][own + r * STEP], x + (ok ? row * d + col : 0), ok);
        }
#pragma unroll
        for (int r = 0; r < E_LOADS; ++r) {
            const int code = code0 + own + r * STEP;
            const bool ok = col_ok && code < k;
            copy_async(&es[buf][col_own][own + r * STEP], codebook + (ok ? (long long)code * d + col : 0), ok);
        }
    };

    T acc[TM][TN];
    T best[TM];
    int best_index[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        best[i] = Limits<T>::inf();
        best_index[i] = MINIVQ_INT_MAX;
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
    }

    if (stages > 0) issue(0, 0);
    copy_async_wait();
    __syncthreads();
    for (int s = 0; s < stages; ++s) {
        const int buf = s & 1;
        // Buffer buf ^ 1 was last read in stage s - 1, which every thread has finished (barrier below).
        if (s + 1 < stages) issue(s + 1, buf ^ 1);
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            T a_lo[HM], a_hi[HM], b_lo[HN], b_hi[HN];
            SharedVector<T, HM>::load(a_lo, &xs[buf][kk][ty * HM]);
            SharedVector<T, HM>::load(a_hi, &xs[buf][kk][BM / 2 + ty * HM]);
            SharedVector<T, HN>::load(b_lo, &es[buf][kk][tx * HN]);
            SharedVector<T, HN>::load(b_hi, &es[buf][kk][BN / 2 + tx * HN]);
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const T a = i < HM ? a_lo[i] : a_hi[i - HM];
#pragma unroll
                for (int j = 0; j < TN; ++j)
                    acc[i][j] = fma_rn(a, j < HN ? b_lo[j] : b_hi[j - HN], acc[i][j]);
            }
        }
        if ((s + 1) % chunks == 0) {   // last slice of a code tile: fold its scores into the bests
            const int code0 = (tile_begin + s / chunks) * BN;
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int code = code0 + (j < HN ? tx * HN + j : BN / 2 + tx * HN + (j - HN));
                const bool valid = code < k;
                const T norm = valid ? norms[code] : T(0);
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const T score = fma_rn(T(-2), acc[i][j], norm);
                    if (valid && better(score, code, best[i], best_index[i])) {
                        best[i] = score;
                        best_index[i] = code;
                    }
                    acc[i][j] = T(0);
                }
            }
        }
        copy_async_wait();
        __syncthreads();
    }

    // The 16 threads of a half warp share their rows: butterfly-reduce their (score, index) pairs.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        T score = best[i];
        int index = best_index[i];
#pragma unroll
        for (int offset = 8; offset > 0; offset >>= 1) {
            const T other_score = __shfl_xor_sync(0xffffffffu, score, offset);
            const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
            if (better(other_score, other_index, score, index)) {
                score = other_score;
                index = other_index;
            }
        }
        const long long row = row0 + (i < HM ? ty * HM + i : BM / 2 + ty * HM + (i - HM));
        if (tx == 0 && row < n) {
            if (gridDim.y == 1) {
                out[row] = index;
            } else {
                part_score[(long long)blockIdx.y * n + row] = score;
                part_index[(long long)blockIdx.y * n + row] = index;
            }
        }
    }
}

// The winner over the codebook splits of every row, lexicographically (splits are in code order).
template <typename T>
__device__ __forceinline__ void reduce_splits_body(
    const T* __restrict__ part_score, const int* __restrict__ part_index, int n, int splits,
    long long* __restrict__ out)
{
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= n) return;
    T score = part_score[row];
    int index = part_index[row];
    for (int split = 1; split < splits; ++split) {
        const T other_score = part_score[(long long)split * n + row];
        const int other_index = part_index[(long long)split * n + row];
        if (better(other_score, other_index, score, index)) {
            score = other_score;
            index = other_index;
        }
    }
    out[row] = index;
}

template <typename T>
__device__ __forceinline__ void code_norms_body(const T* __restrict__ codebook, int k, int d, T* __restrict__ norms)
{
    const long long code = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (code >= k) return;
    const T* e = codebook + code * d;
    T sum = T(0);
    for (int c = 0; c < d; ++c) sum = fma_rn(e[c], e[c], sum);
    norms[code] = sum;
}

extern "C" __global__ void __launch_bounds__(MINIVQ_THREADS, 2)
nearest_code_f32(const float* __restrict__ x, const float* __restrict__ codebook, const float* __restrict__ norms,
                 int n, int k, int d, int tiles_per_split,
                 long long* __restrict__ out, float* __restrict__ part_score, int* __restrict__ part_index)
{
    nearest_code_body<float, 8, 8, 8>(x, codebook, norms, n, k, d, tiles_per_split, out, part_score, part_index);
}

extern "C" __global__ void __launch_bounds__(MINIVQ_THREADS, 2)
nearest_code_f64(const double* __restrict__ x, const double* __restrict__ codebook, const double* __restrict__ norms,
                 int n, int k, int d, int tiles_per_split,
                 long long* __restrict__ out, double* __restrict__ part_score, int* __restrict__ part_index)
{
    nearest_code_body<double, 4, 4, 16>(x, codebook, norms, n, k, d, tiles_per_split, out, part_score, part_index);
}

extern "C" __global__ void reduce_splits_f32(const float* __restrict__ part_score, const int* __restrict__ part_index,
                                             int n, int splits, long long* __restrict__ out)
{
    reduce_splits_body<float>(part_score, part_index, n, splits, out);
}

extern "C" __global__ void reduce_splits_f64(const double* __restrict__ part_score, const int* __restrict__ part_index,
                                             int n, int splits, long long* __restrict__ out)
{
    reduce_splits_body<double>(part_score, part_index, n, splits, out);
}

extern "C" __global__ void code_norms_f32(const float* __restrict__ codebook, int k, int d, float* __restrict__ norms)
{
    code_norms_body<float>(codebook, k, d, norms);
}

extern "C" __global__ void code_norms_f64(const double* __restrict__ codebook, int k, int d, double* __restrict__ norms)
{
    code_norms_body<double>(codebook, k, d, norms);
}
