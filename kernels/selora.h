// What selora.cpp (the op) and selora.cu (the per-sample Fisher kernels) share.
#pragma once
#include <ATen/ATen.h>

// How per_sample_grad_fisher splits its work: every launch branch of the Fisher kernels is a value of this.
struct FisherPlan {
  bool tensor_cores;  // the tensor-core kernel (fp16/bf16, q > 8), else the CUDA-core one with `qpt`
  int qpt;            // columns of Q per thread of the CUDA-core kernel (0 with tensor cores)
  int tiles;          // blocks across P's columns
  int slices;         // blocks across Q's columns (P is read once per slice)
  int runs;           // blocks across each sample's tokens
  int run_len;        // tokens per run
  int ws_q, ws_n;     // the workspace's [q, n], padded to whole tensor-core fragments
  bool vectorized;    // rows of P are a whole number of 16-byte loads
};

FisherPlan fisher_plan(int64_t n, int64_t q, int64_t tokens, int64_t samples, at::ScalarType dtype,
                       int64_t sms);

// grad = Σ_i G_i and fisher = Σ_i G_i ⊙ G_i with G_i = scale · P_iᵀ Q_i (samples i of T = M / samples rows):
// see selora.cu.
void per_sample_grad_fisher(const at::Tensor& P, const at::Tensor& Q, int64_t q_main, int64_t samples, double scale,
                            bool q_major, at::Tensor& grad, at::Tensor& fisher, const c10::optional<at::Tensor>& grad_extra,
                            const c10::optional<at::Tensor>& fisher_extra);
