// Per-sample gradients and their Fisher sums for the fused SeLoRA op (selora.cpp drives the whole op).
//
// Both Fisher reductions have one shape. With P [M, n] (grad_y or x), Q [M, q] (u = x [A; K]ᵀ, whose
// last column is the candidate's projection p = x·K, or v = grad_y·B) and the M rows grouped into N
// samples of T tokens:
//     G_i = s · Σ_t P[i,t]ᵀ ⊗ Q[i,t]      [n, q], the gradient of sample i
//     grad = Σ_i G_i,   fisher = Σ_i G_i ⊙ G_i
// The sum over t runs on chip: a block holds a 64-column tile of P for one run of one sample's tokens
// and keeps its [64, q] partial tile in registers. Only when samples × tiles alone cannot fill the GPU
// (n = 320 with N = 8 makes 40 blocks) are a sample's tokens split into a few runs; each run's tile
// goes to a small workspace [N·runs, q, n] and a second kernel adds the runs, squares per sample and
// sums over samples in a fixed order, so results are deterministic (no float atomics). Per-token
// outer products never leave the registers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;           // columns of P per block, two per lane
constexpr int kMinRun = 64;         // fewest tokens worth a block of their own
constexpr int kMaxPartials = 64;    // cap on N·runs, the terms each output of the second kernel sums

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// Block (tile, sample·runs + run, q-slice). Warp w takes Q columns of group w % q_groups (QPT each)
// and every (8 / q_groups)-th token of the run; the token groups are added in shared memory.
template <typename scalar_t, typename acc_t, int QPT>
__global__ void __launch_bounds__(kThreads) run_outer_kernel(
    const scalar_t* __restrict__ P, const scalar_t* __restrict__ Q, acc_t* __restrict__ partial, int n, int q,
    int T, int run_len, int runs, int q_groups) {
  __shared__ acc_t tile[kWarps][QPT][kTile];
  static_assert(sizeof(tile) <= 48 * 1024, "a block's static shared memory is limited to 48 KiB");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int q_group = warp % q_groups, token_group = warp / q_groups, token_groups = kWarps / q_groups;
  const int c0 = blockIdx.x * kTile + lane, c1 = c0 + 32;
  const int j0 = (blockIdx.z * q_groups + q_group) * QPT;
  const int sample = blockIdx.y / runs, run = blockIdx.y % runs;
  const int t_end = min(T, (run + 1) * run_len);

  acc_t acc0[QPT], acc1[QPT];
#pragma unroll
  for (int k = 0; k < QPT; ++k) acc0[k] = acc1[k] = acc_t(0);

#pragma unroll 4
  for (int t = run * run_len + token_group; t < t_end; t += token_groups) {
    const int64_t row = static_cast<int64_t>(sample) * T + t;
    const acc_t p0 = c0 < n ? static_cast<acc_t>(P[row * n + c0]) : acc_t(0);
    const acc_t p1 = c1 < n ? static_cast<acc_t>(P[row * n + c1]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < QPT; ++k) {
      const int j = j0 + k;
      const acc_t qv = j < q ? static_cast<acc_t>(Q[row * q + j]) : acc_t(0);
      acc0[k] += p0 * qv;
      acc1[k] += p1 * qv;
    }
  }

#pragma unroll
  for (int k = 0; k < QPT; ++k) {
    tile[warp][k][lane] = acc0[k];
    tile[warp][k][lane + 32] = acc1[k];
  }
  __syncthreads();
  if (token_group != 0) return;
#pragma unroll
  for (int k = 0; k < QPT; ++k) {
    const int j = j0 + k;
    if (j >= q) break;
    for (int half = 0; half < 2; ++half) {
      const int col = lane + 32 * half, c = blockIdx.x * kTile + col;
      acc_t sum = acc_t(0);
      for (int g = 0; g < token_groups; ++g) sum += tile[g * q_groups + q_group][k][col];
      if (c < n) partial[(static_cast<int64_t>(blockIdx.y) * q + j) * n + c] = sum;
    }
  }
}

// One thread per (j, c): adds sample i's runs into G_i[c, j], scales, squares, and sums over samples.
// Column q_main (the candidate) yields its gradient and Fisher term per c into the `_extra` outputs.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) sum_samples_kernel(
    const acc_t* __restrict__ partial, int samples, int runs, int n, int q_main, int q, acc_t scale,
    bool q_major, scalar_t* __restrict__ grad, acc_t* __restrict__ fisher, acc_t* __restrict__ grad_extra,
    acc_t* __restrict__ fisher_extra) {
  const int64_t total = static_cast<int64_t>(q) * n;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = static_cast<int>(e / n), c = static_cast<int>(e % n);
    acc_t sum = acc_t(0), sum_sq = acc_t(0);
    for (int i = 0; i < samples; ++i) {
      acc_t g = acc_t(0);
#pragma unroll 4
      for (int r = 0; r < runs; ++r) g += partial[(static_cast<int64_t>(i) * runs + r) * total + e];
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

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

template <typename scalar_t, typename acc_t, int QPT>
void launch_runs(dim3 grid, cudaStream_t stream, const at::Tensor& P, const at::Tensor& Q, at::Tensor& partial, int T,
                 int run_len, int runs, int q_groups) {
  run_outer_kernel<scalar_t, acc_t, QPT><<<grid, kThreads, 0, stream>>>(
      P.data_ptr<scalar_t>(), Q.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), static_cast<int>(P.size(1)),
      static_cast<int>(Q.size(1)), T, run_len, runs, q_groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  TORCH_CHECK(n < (int64_t{1} << 31) && M / samples < (int64_t{1} << 31),
              "selora: tensor too large for the Fisher kernel: ", M, " rows of ", n);
  const int T = static_cast<int>(M / samples);

  // Q columns per thread (QPT) and per block (QPT·q_groups): few columns use all 8 warps for tokens.
  int qpt = 8, q_groups = 8;
  if (q <= 8) {
    q_groups = 1;
    qpt = q <= 1 ? 1 : q <= 2 ? 2 : q <= 4 ? 4 : 8;
  } else if (q <= 64) {
    q_groups = q <= 16 ? 2 : q <= 32 ? 4 : 8;
  } else if (q <= 72) {
    qpt = 9;  // rank 64 plus the candidate in one pass
  }
  const int slices = ceil_div(q, qpt * q_groups);
  const int tiles = ceil_div(n, kTile);

  // Split each sample's tokens into runs only as far as needed to give every multiprocessor ~4 blocks.
  const int64_t blocks = static_cast<int64_t>(tiles) * samples * slices;
  const int64_t wanted = 4 * multiprocessors();
  int64_t runs = std::min<int64_t>({(wanted + blocks - 1) / blocks, ceil_div(T, kMinRun),
                                    std::max<int64_t>(1, kMaxPartials / samples)});
  runs = std::max<int64_t>(runs, 1);
  const int run_len = ceil_div(T, runs);
  runs = ceil_div(T, run_len);
  TORCH_CHECK(samples * runs < 65536 && slices < 65536, "selora: too many samples for the Fisher kernel (",
              samples, ")");

  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(tiles, static_cast<unsigned>(samples * runs), slices);
  const at::ScalarType acc_type = P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({samples * runs, q, n}, P.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, P.scalar_type(), "selora_per_sample_grad_fisher", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    switch (qpt) {
      case 1: launch_runs<scalar_t, acc_t, 1>(grid, stream, P, Q, partial, T, run_len, runs, q_groups); break;
      case 2: launch_runs<scalar_t, acc_t, 2>(grid, stream, P, Q, partial, T, run_len, runs, q_groups); break;
      case 4: launch_runs<scalar_t, acc_t, 4>(grid, stream, P, Q, partial, T, run_len, runs, q_groups); break;
      case 8: launch_runs<scalar_t, acc_t, 8>(grid, stream, P, Q, partial, T, run_len, runs, q_groups); break;
      default: launch_runs<scalar_t, acc_t, 9>(grid, stream, P, Q, partial, T, run_len, runs, q_groups);
    }
    const int64_t outputs = q * n;
    const int sum_blocks = static_cast<int>(std::min<int64_t>(ceil_div(outputs, kThreads), wanted * 2));
    sum_samples_kernel<scalar_t, acc_t><<<sum_blocks, kThreads, 0, stream>>>(
        partial.data_ptr<acc_t>(), static_cast<int>(samples), static_cast<int>(runs), static_cast<int>(n),
        static_cast<int>(q_main), static_cast<int>(q), static_cast<acc_t>(scale), q_major,
        grad.data_ptr<scalar_t>(), fisher.data_ptr<acc_t>(),
        grad_extra.has_value() ? grad_extra->data_ptr<acc_t>() : nullptr,
        fisher_extra.has_value() ? fisher_extra->data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}
