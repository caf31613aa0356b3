// Per-sample gradients and their Fisher sums for the fused SeLoRA op (selora.cpp drives the whole op).
//
// Both Fisher reductions have one shape. With P [M, n] (grad_y or x), Q [M, q] (u = x [A; K]ᵀ, whose
// last column is the candidate's projection p = x·K, or v = grad_y·B) and the M rows grouped into N
// samples of T tokens:
//     G_i = s · Σ_t P[i,t]ᵀ ⊗ Q[i,t]      [n, q], the gradient of sample i
//     grad = Σ_i G_i,   fisher = Σ_i G_i ⊙ G_i
// P is the big operand (n = 320…10240 columns) and Q the thin one (q = rank + 1 at most), so the work is
// one read of P at 2·q FLOPs per element: memory-bound on the CUDA cores up to q ≈ 8 (bf16), and on the
// tensor cores beyond. A block owns a tile of P's columns for one run of one sample's tokens:
//  * `simt_partials_kernel` (q small, or fp32/fp64): each thread reads 16 bytes of a token row per load,
//    kUnroll rows at once, and keeps a [VEC, QPT] tile of sums in registers; the block's Q rows are
//    staged in shared memory, converted once to the accumulation type.
//  * `mma_partials_kernel` (fp16/bf16, q > 8): the block stages [64 tokens × 128 columns] of P (16-byte
//    loads, the next stage in flight during the products) and [64 tokens × ≤ 80] of Q in shared memory,
//    and each warp multiplies its 16 columns on the tensor cores (wmma, fp32 accumulators).
// Each (sample, run) writes its tile of G_i to a workspace; `sum_samples_kernel` adds a sample's runs,
// scales, squares and sums over samples in a fixed order: deterministic, no float atomics, and per-token
// outer products never leave the chip. Tokens are split into runs only as far as needed to fill the GPU
// and while the workspace stays small next to P.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <mma.h>

#include <type_traits>

#include "selora.h"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxPartials = 64;  // cap on N·runs, the terms each output of sum_samples_kernel adds

// CUDA-core kernel: 8 lanes read one token row's 128-byte segment, so a block has 32 rows in flight per
// load and kUnroll loads per thread before the first product.
constexpr int kRowLanes = 8;
constexpr int kRowGroups = kThreads / kRowLanes;
constexpr int kUnroll = 4;
constexpr int kStep = kRowGroups * kUnroll;  // tokens per block step
constexpr int kReduceBytes = 32 * 1024;      // shared memory for the block's final sum over row groups

// Tensor-core kernel: 8 warps × 16 columns, 64 tokens per stage, up to 5 × 16 columns of Q per block.
constexpr int kMmaCols = kWarps * 16;
constexpr int kMmaStep = 64;
constexpr int kMmaFrags = 5;
constexpr int kMmaQ = kMmaFrags * 16;
constexpr int kMmaPad = 8;  // 16 bytes per shared row: ldmatrix rows land in different banks

constexpr int cmin(int a, int b) { return a < b ? a : b; }

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> struct MmaType { using type = void; };
template <> struct MmaType<at::Half> { using type = __half; };
template <> struct MmaType<at::BFloat16> { using type = __nv_bfloat16; };

// 16 bytes of one row: the unit of every load of P.
template <typename scalar_t>
struct alignas(16) Vec {
  static constexpr int size = 16 / sizeof(scalar_t);
  scalar_t v[size];
};

// Columns [c, c + VEC) of a row of P, zeros past n: one 16-byte load where the row allows it.
template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> load_columns(const scalar_t* __restrict__ row, int c, int n, bool vectorized) {
  constexpr int VEC = Vec<scalar_t>::size;
  if (vectorized && c + VEC <= n) return *reinterpret_cast<const Vec<scalar_t>*>(row + c);
  Vec<scalar_t> out;
#pragma unroll
  for (int e = 0; e < VEC; ++e) out.v[e] = c + e < n ? row[c + e] : scalar_t(0);
  return out;
}

template <typename scalar_t>
__device__ __forceinline__ Vec<scalar_t> zero_columns() {
  Vec<scalar_t> out;
#pragma unroll
  for (int e = 0; e < Vec<scalar_t>::size; ++e) out.v[e] = scalar_t(0);
  return out;
}

// Block (column tile, sample·runs + run, slice of QPT columns of Q). Thread (row group g, lane l of 8) sums
// columns tile·W + 8l·… of P times Q's slice over tokens g, g + 32, … of the run; the 32 row groups are
// then added in shared memory, in a fixed order, into partial[sample·runs + run, j, c].
template <typename scalar_t, typename acc_t, int QPT>
__global__ void __launch_bounds__(kThreads, 2) simt_partials_kernel(
    const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q, acc_t* __restrict__ partial, int n, int q,
    int T, int run_len, int runs, bool vectorized) {
  constexpr int VEC = Vec<scalar_t>::size;
  constexpr int W = kRowLanes * VEC;
  constexpr int kChunk = cmin(QPT, kReduceBytes / (kRowGroups * W * static_cast<int>(sizeof(acc_t))));
  __shared__ acc_t q_tile[kStep][QPT];
  __shared__ acc_t reduce[kRowGroups][kChunk * W];
  static_assert(sizeof(q_tile) + sizeof(reduce) <= 48 * 1024, "a block's static shared memory is limited to 48 KiB");

  const int row_group = threadIdx.x / kRowLanes, col = threadIdx.x % kRowLanes * VEC;
  const int c = blockIdx.x * W + col, j0 = blockIdx.z * QPT;
  const int sample = blockIdx.y / runs, run = blockIdx.y % runs;
  const int t_begin = run * run_len, t_end = min(T, t_begin + run_len);
  const int64_t sample_row = static_cast<int64_t>(sample) * T;

  acc_t acc[VEC][QPT];
#pragma unroll
  for (int e = 0; e < VEC; ++e)
#pragma unroll
    for (int k = 0; k < QPT; ++k) acc[e][k] = acc_t(0);

  for (int t0 = t_begin; t0 < t_end; t0 += kStep) {
    Vec<scalar_t> rows[kUnroll];  // all loads issued before the first product
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + row_group + u * kRowGroups;
      rows[u] = t < t_end ? load_columns(P + (sample_row + t) * n, c, n, vectorized) : zero_columns<scalar_t>();
    }
    __syncthreads();  // the previous step is done with q_tile
    for (int e = threadIdx.x; e < kStep * QPT; e += kThreads) {
      const int tt = e / QPT, k = e % QPT, t = t0 + tt, j = j0 + k;
      q_tile[tt][k] = t < t_end && j < q ? static_cast<acc_t>(Q[(sample_row + t) * q + j]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc_t qv[QPT];
#pragma unroll
      for (int k = 0; k < QPT; ++k) qv[k] = q_tile[row_group + u * kRowGroups][k];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const acc_t p = static_cast<acc_t>(rows[u].v[e]);
#pragma unroll
        for (int k = 0; k < QPT; ++k) acc[e][k] += p * qv[k];
      }
    }
  }

  // Sum over the row groups, kChunk columns of Q at a time.
#pragma unroll
  for (int k0 = 0; k0 < QPT; k0 += kChunk) {
    if (k0 > 0) __syncthreads();  // the previous chunk's sums are read
#pragma unroll
    for (int k = 0; k < kChunk; ++k)
      if (k0 + k < QPT)
#pragma unroll
        for (int e = 0; e < VEC; ++e) reduce[row_group][k * W + col + e] = acc[e][k0 + k];
    __syncthreads();
    for (int idx = threadIdx.x; idx < kChunk * W; idx += kThreads) {
      const int k = idx / W, cc = blockIdx.x * W + idx % W, j = j0 + k0 + k;
      if (k0 + k >= QPT || j >= q || cc >= n) continue;
      acc_t sum = acc_t(0);
      for (int g = 0; g < kRowGroups; ++g) sum += reduce[g][idx];
      partial[(static_cast<int64_t>(blockIdx.y) * q + j) * n + cc] = sum;
    }
  }
}

constexpr int kMmaVecsPerRow = kMmaCols * 2 / 16;                 // 16-byte loads per row of a P tile
constexpr int kPLoads = kMmaStep * kMmaVecsPerRow / kThreads;     // per thread per stage

// Thread's share of the [kMmaStep tokens × kMmaCols] tile of P starting at token t0 (zeros past t_end or n).
template <typename scalar_t>
__device__ __forceinline__ void load_stage(const scalar_t* __restrict__ P, Vec<scalar_t> (&out)[kPLoads],
                                           int64_t sample_row, int t0, int t_end, int c0, int n, bool vectorized) {
#pragma unroll
  for (int i = 0; i < kPLoads; ++i) {
    const int idx = threadIdx.x + i * kThreads, t = t0 + idx / kMmaVecsPerRow;
    out[i] = t < t_end ? load_columns(P + (sample_row + t) * n, c0 + idx % kMmaVecsPerRow * Vec<scalar_t>::size,
                                      n, vectorized)
                       : zero_columns<scalar_t>();
  }
}

// Block (tile of 128 columns, sample·runs + run, slice of 80 columns of Q); warp w owns columns
// tile·128 + 16w … + 16 and multiplies them, as the [16 × tokens] matrix A = P[tokens, cols]ᵀ, with
// B = Q[tokens, slice]. Its [16 × 16·frags] sums go to partial[sample·runs + run, j, c] (padded to
// ws_q = 16⌈q/16⌉ and ws_n = 128·tiles so that whole fragments are stored).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) mma_partials_kernel(
    const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q, float* __restrict__ partial, int n, int q,
    int T, int run_len, int runs, int ws_q, int ws_n, bool vectorized) {
  using namespace nvcuda;
  using mma_t = typename MmaType<scalar_t>::type;
  constexpr int VEC = Vec<scalar_t>::size, kVecsPerRow = kMmaVecsPerRow;
  static_assert(VEC * kVecsPerRow == kMmaCols, "a P tile row is a whole number of 16-byte loads");
  constexpr int kPStride = kMmaCols + kMmaPad, kQStride = kMmaQ + kMmaPad;
  __shared__ __align__(32) scalar_t p_tile[kMmaStep][kPStride];
  __shared__ __align__(32) scalar_t q_tile[kMmaStep][kQStride];
  static_assert(sizeof(p_tile) + sizeof(q_tile) <= 48 * 1024, "a block's static shared memory is limited to 48 KiB");

  const int warp = threadIdx.x / 32;
  const int c0 = blockIdx.x * kMmaCols, j0 = blockIdx.z * kMmaQ;
  const int frags = cmin(kMmaFrags, (cmin(q - j0, kMmaQ) + 15) / 16), q_cols = frags * 16;
  const int sample = blockIdx.y / runs, run = blockIdx.y % runs;
  const int t_begin = run * run_len, t_end = min(T, t_begin + run_len);
  const int64_t sample_row = static_cast<int64_t>(sample) * T;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kMmaFrags];
#pragma unroll
  for (int f = 0; f < kMmaFrags; ++f) wmma::fill_fragment(acc[f], 0.0f);

  // P's next stage waits in registers while this one is multiplied; Q's few, L2-resident rows go straight
  // to shared memory, their latency hidden behind P's loads.
  Vec<scalar_t> p_next[kPLoads];
  load_stage(P, p_next, sample_row, t_begin, t_end, c0, n, vectorized);
  for (int t0 = t_begin; t0 < t_end; t0 += kMmaStep) {
    __syncthreads();  // the previous stage's products are done with the tiles
#pragma unroll
    for (int i = 0; i < kPLoads; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      *reinterpret_cast<Vec<scalar_t>*>(&p_tile[idx / kVecsPerRow][idx % kVecsPerRow * VEC]) = p_next[i];
    }
    if (t0 + kMmaStep < t_end) load_stage(P, p_next, sample_row, t0 + kMmaStep, t_end, c0, n, vectorized);
    for (int idx = threadIdx.x; idx < kMmaStep * q_cols; idx += kThreads) {
      const int t = t0 + idx / q_cols, j = j0 + idx % q_cols;
      q_tile[idx / q_cols][idx % q_cols] = t < t_end && j < q ? Q[(sample_row + t) * q + j] : scalar_t(0);
    }
    __syncthreads();
    const int tokens = min(kMmaStep, t_end - t0);
    for (int k = 0; k < tokens; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, mma_t, wmma::col_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const mma_t*>(&p_tile[k][warp * 16]), kPStride);
#pragma unroll
      for (int f = 0; f < kMmaFrags; ++f) {
        if (f >= frags) break;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, mma_t, wmma::row_major> b;
        wmma::load_matrix_sync(b, reinterpret_cast<const mma_t*>(&q_tile[k][f * 16]), kQStride);
        wmma::mma_sync(acc[f], a, b, acc[f]);
      }
    }
  }
#pragma unroll
  for (int f = 0; f < kMmaFrags; ++f) {
    if (f >= frags) break;
    float* out = partial + (static_cast<int64_t>(blockIdx.y) * ws_q + j0 + f * 16) * ws_n + c0 + warp * 16;
    wmma::store_matrix_sync(out, acc[f], ws_n, wmma::mem_col_major);
  }
}

// One thread per (j, c): adds sample i's runs into G_i[c, j], scales, squares, and sums over samples.
// Column q_main (the candidate) yields its gradient and Fisher term per c into the `_extra` outputs.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_samples_kernel(
    const acc_t* __restrict__ partial, int samples, int runs, int n, int q_main, int q, int ws_q, int ws_n,
    acc_t scale, bool q_major, scalar_t* __restrict__ grad, acc_t* __restrict__ fisher,
    acc_t* __restrict__ grad_extra, acc_t* __restrict__ fisher_extra) {
  const int64_t total = static_cast<int64_t>(q) * n, stride = static_cast<int64_t>(ws_q) * ws_n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(e / n), c = static_cast<int>(e % n);
    const acc_t* first = partial + static_cast<int64_t>(j) * ws_n + c;
    acc_t sum = acc_t(0), sum_sq = acc_t(0);
    for (int i = 0; i < samples; ++i) {
      acc_t g = acc_t(0);
#pragma unroll 4
      for (int r = 0; r < runs; ++r) g += first[(static_cast<int64_t>(i) * runs + r) * stride];
      g *= scale;
      sum += g;
      sum_sq += g * g;
    }
    if (j < q_main) {
      const int64_t out = q_major ? static_cast<int64_t>(j) * n + c : static_cast<int64_t>(c) * q_main + j;
      grad[out] = static_cast<scalar_t>(sum);
      fisher[out] = sum_sq;
    } else {
      grad_extra[c] = sum;
      fisher_extra[c] = sum_sq;
    }
  }
}

int multiprocessors() {  // of the current device, which the caller has set to the inputs'
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Q columns per thread of the CUDA-core kernel: the fewest that cover q, up to the register budget.
int simt_columns(int64_t q, size_t itemsize) {
  const int widest = itemsize == 4 ? 16 : 8;
  for (int qpt : {1, 2, 3, 4, 5, 6, 8, 12, 16})
    if (qpt >= q || qpt == widest) return qpt;
  return widest;
}

}  // namespace

FisherPlan fisher_plan(int64_t n, int64_t q, int64_t tokens, int64_t samples, at::ScalarType dtype,
                       int64_t sms) {
  TORCH_CHECK(n >= 1 && q >= 1 && tokens >= 1 && samples >= 1 && sms >= 1,
              "selora: no Fisher kernel plan for an empty problem");
  const size_t itemsize = at::elementSize(dtype);
  FisherPlan p;
  p.tensor_cores = (dtype == at::kHalf || dtype == at::kBFloat16) && q > 8;
  p.vectorized = n * static_cast<int64_t>(itemsize) % 16 == 0;
  int64_t min_run;
  if (p.tensor_cores) {
    p.qpt = 0;
    p.tiles = static_cast<int>(ceil_div(n, kMmaCols));
    p.slices = static_cast<int>(ceil_div(q, kMmaQ));
    p.ws_q = static_cast<int>(ceil_div(q, 16) * 16);
    p.ws_n = p.tiles * kMmaCols;
    min_run = kMmaStep;
  } else {
    p.qpt = simt_columns(q, itemsize);
    p.tiles = static_cast<int>(ceil_div(n, kRowLanes * static_cast<int64_t>(16 / itemsize)));
    p.slices = static_cast<int>(ceil_div(q, p.qpt));
    p.ws_q = static_cast<int>(q);
    p.ws_n = static_cast<int>(n);
    min_run = kStep;
  }
  // Runs: enough blocks for ~4 per multiprocessor, but no run shorter than a block step, at most
  // kMaxPartials partial tiles per output, and a workspace (written and read once) under half of P's bytes.
  const int64_t acc_size = dtype == at::kDouble ? 8 : 4;
  const int64_t blocks = static_cast<int64_t>(p.tiles) * samples * p.slices;
  const int64_t runs = std::max<int64_t>(1, std::min<int64_t>({ceil_div(4 * sms, blocks),
                                                                ceil_div(tokens, min_run), kMaxPartials / samples,
                                                                tokens * static_cast<int64_t>(itemsize) /
                                                                    (4 * p.ws_q * acc_size)}));
  p.run_len = static_cast<int>(ceil_div(tokens, runs));
  p.runs = static_cast<int>(ceil_div(tokens, p.run_len));
  return p;
}

namespace {

template <typename scalar_t, typename acc_t, int QPT>
void launch_simt(const FisherPlan& p, dim3 grid, cudaStream_t stream, const at::Tensor& P, const at::Tensor& Q,
                 at::Tensor& partial, int T, bool vectorized) {
  simt_partials_kernel<scalar_t, acc_t, QPT><<<grid, kThreads, 0, stream>>>(
      P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), static_cast<int>(P.size(1)),
      static_cast<int>(Q.size(1)), T, p.run_len, p.runs, vectorized);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t>
void launch_partials(const FisherPlan& p, dim3 grid, cudaStream_t stream, const at::Tensor& P, const at::Tensor& Q,
                     at::Tensor& partial, int T, bool vectorized) {
  if constexpr (!std::is_void_v<typename MmaType<scalar_t>::type>) {
    if (p.tensor_cores) {
      mma_partials_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), partial.data_ptr<float>(), static_cast<int>(P.size(1)),
          static_cast<int>(Q.size(1)), T, p.run_len, p.runs, p.ws_q, p.ws_n, vectorized);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  switch (p.qpt) {
    case 1: return launch_simt<scalar_t, acc_t, 1>(p, grid, stream, P, Q, partial, T, vectorized);
    case 2: return launch_simt<scalar_t, acc_t, 2>(p, grid, stream, P, Q, partial, T, vectorized);
    case 3: return launch_simt<scalar_t, acc_t, 3>(p, grid, stream, P, Q, partial, T, vectorized);
    case 4: return launch_simt<scalar_t, acc_t, 4>(p, grid, stream, P, Q, partial, T, vectorized);
    case 5: return launch_simt<scalar_t, acc_t, 5>(p, grid, stream, P, Q, partial, T, vectorized);
    case 6: return launch_simt<scalar_t, acc_t, 6>(p, grid, stream, P, Q, partial, T, vectorized);
    case 8: return launch_simt<scalar_t, acc_t, 8>(p, grid, stream, P, Q, partial, T, vectorized);
  }
  if constexpr (sizeof(scalar_t) == 4) {
    if (p.qpt == 12) return launch_simt<scalar_t, acc_t, 12>(p, grid, stream, P, Q, partial, T, vectorized);
    if (p.qpt == 16) return launch_simt<scalar_t, acc_t, 16>(p, grid, stream, P, Q, partial, T, vectorized);
  }
  TORCH_CHECK(false, "selora: no Fisher kernel for ", p.qpt, " columns per thread");
}

}  // namespace

// grad (P's dtype) and fisher (fp32, fp64 for fp64 inputs) shaped [n, q_main], or [q_main, n] when
// q_major; when Q has one column more than q_main (the candidate's), grad_extra and fisher_extra [n]
// receive Σ_i G_i[:, q_main] and Σ_i G_i[:, q_main]². All inputs contiguous, on the current device;
// outputs are fully overwritten.
void per_sample_grad_fisher(const at::Tensor& P, const at::Tensor& Q, int64_t q_main, int64_t samples, double scale,
                            bool q_major, at::Tensor& grad, at::Tensor& fisher, const c10::optional<at::Tensor>& grad_extra,
                            const c10::optional<at::Tensor>& fisher_extra) {
  const int64_t M = P.size(0), n = P.size(1), q = Q.size(1);
  TORCH_CHECK(q == q_main || (q == q_main + 1 && grad_extra.has_value() && fisher_extra.has_value()),
              "selora: the Fisher kernel takes at most one extra column, with outputs for it");
  TORCH_CHECK(samples >= 1 && M >= samples && M % samples == 0 && q_main >= 1 && P.is_contiguous() &&
                  Q.is_contiguous() && Q.size(0) == M,
              "selora: the Fisher kernel needs contiguous P [M, n] and Q [M, q >= 1] with samples dividing M > 0");
  if (n == 0) return;  // no columns, no outputs (and an empty grid is no launch)
  TORCH_CHECK(n < (int64_t{1} << 30) && M / samples < (int64_t{1} << 31),
              "selora: tensor too large for the Fisher kernel: ", M, " rows of ", n);
  const int T = static_cast<int>(M / samples);
  const FisherPlan p = fisher_plan(n, q, T, samples, P.scalar_type(), multiprocessors());
  TORCH_CHECK(samples * p.runs < 65536 && p.slices < 65536, "selora: too many samples for the Fisher kernel (",
              samples, ")");
  const bool vectorized = p.vectorized && reinterpret_cast<uintptr_t>(P.data_ptr()) % 16 == 0;

  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(p.tiles, static_cast<unsigned>(samples * p.runs), p.slices);
  const at::ScalarType acc_type = P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({samples * p.runs, p.ws_q, p.ws_n}, P.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "selora_per_sample_grad_fisher", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    launch_partials<scalar_t, acc_t>(p, grid, stream, P, Q, partial, T, vectorized);
    const int64_t outputs = q * n;
    const int sum_blocks = static_cast<int>(std::min<int64_t>(ceil_div(outputs, kThreads), 8 * multiprocessors()));
    sum_samples_kernel<scalar_t, acc_t><<<sum_blocks, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), static_cast<int>(samples), p.runs, static_cast<int>(n), static_cast<int>(q_main),
        static_cast<int>(q), p.ws_q, p.ws_n, static_cast<acc_t>(scale), q_major, grad.data_ptr<scalar_t>(),
        fisher.data_ptr<acc_t>(), grad_extra.has_value() ? grad_extra->data_ptr<acc_t>() : nullptr,
        fisher_extra.has_value() ? fisher_extra->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
