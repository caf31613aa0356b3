// The fused SeLoRA op: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ and its backward with per-sample Fisher terms.
// Same contract as minisd/adapters/op.py (the reference): x [M, in] holds N samples of T = M / N
// consecutive rows, W [out, in], A [r, in], B [out, r].
//
// Where the time goes is cuBLAS reading x, grad_y and W; everything else is arranged around that.
//  * the candidate: while a layer tests one (Fisher tracking), its A row K rides along as row r of the
//    forward's u = x [A; K]ᵀ product, so x is read once for both and p = x·K is u's last column.
//  * forward: the reference makes three GEMMs and two passes over y (x Wᵀ + b, then + s·u Bᵀ).
//    When M > in, folding the update into the weight, W' = W + s·B A (one [out, in] GEMM), makes y
//    one GEMM with the bias in its epilogue; it adds 2·out·in of traffic and saves 2·M·out plus the
//    elementwise passes. When M ≤ in (text tokens, time embeddings) W' would cost more than it saves,
//    so s·u Bᵀ is accumulated into y by a second GEMM with beta = 1 (no separate add).
//    One GEMM over concatenated [x | u]·[W | sB]ᵀ would need a fresh [W | sB] per step as W' does,
//    plus a copy of x: strictly more traffic.
//  * backward: grad_x = g W' by the same rule (fold when M > out, else g W then += s·v A), with
//    v = g B [M, r] shared with grad A. Without a candidate, grad A = s vᵀ x and grad B = s gᵀ u are
//    two GEMMs. With one, `fisher` says which estimator: "batch" makes grad B and the candidate's
//    G_new one GEMM gᵀ[u | p]; "sample" runs the per-sample kernel (selora.cu), which reads g with
//    [u | p] and x with v once each and yields grad B, G_new, F_B, F_new and grad A, F_A together,
//    deterministically.
//  * autocast: the op's products run in its inputs' dtype whatever autocast region it is called in
//    (autocast would turn some of them to half precision and the in-place ones would then refuse them).
#include <torch/extension.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>
#include <string>
#include <sstream>
#include <vector>

#include "selora.h"

namespace {

bool poison_outputs = false;  // debug: NaN-fill outputs before writing them, so unwritten elements show

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "[";
  for (size_t d = 0; d < shape.size(); ++d) s << (d ? ", " : "") << (shape[d] < 0 ? "*" : std::to_string(shape[d]));
  s << "]";
  return s.str();
}

// Checks t against `shape` (-1: any size) and x's device, then returns it in x's dtype, contiguous.
at::Tensor operand(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& shape,
                   const at::Tensor& x) {
  bool fits = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t d = 0; fits && d < shape.size(); ++d) fits = shape[d] < 0 || t.size(d) == shape[d];
  TORCH_CHECK(fits, op, ": ", name, " must have shape ", shape_string(shape), ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", t.scalar_type());
  return t.to(x.scalar_type()).contiguous();
}

// x, W, A, B checked against each other and made contiguous in x's dtype, with the sizes they fix.
struct Operands {
  at::Tensor x, weight, lora_A, lora_B;
  int64_t M, in, out, r;
};

Operands checked_operands(const char* op, const at::Tensor& x_in, const at::Tensor& weight_in,
                          const at::Tensor& lora_A_in, const at::Tensor& lora_B_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) > 0, op, ": x must be [M, in] with M > 0, got shape ", x_in.sizes());
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x_in.device());
  TORCH_CHECK(x_in.is_floating_point(), op, ": x must be a floating-point tensor, got ", x_in.scalar_type());
  Operands o;
  o.x = x_in.contiguous();
  o.M = o.x.size(0);
  o.in = o.x.size(1);
  o.weight = operand(op, "weight", weight_in, {-1, o.in}, o.x);
  o.lora_A = operand(op, "lora_A", lora_A_in, {-1, o.in}, o.x);
  o.out = o.weight.size(0);
  o.r = o.lora_A.size(0);
  TORCH_CHECK(o.r >= 1, op, ": lora_A must have at least one row (rank >= 1)");
  o.lora_B = operand(op, "lora_B", lora_B_in, {o.out, o.r}, o.x);
  return o;
}

// out = x wᵀ (+ bias, fused into the GEMM's epilogue by cuBLASLt where it can).
void linear_into(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  if (bias.has_value()) at::addmm_out(out, *bias, x, w.t());
  else at::mm_out(out, x, w.t());
}

std::tuple<at::Tensor, at::Tensor> selora_forward(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                  const c10::optional<at::Tensor>& bias_in,
                                                  const at::Tensor& lora_A_in, const at::Tensor& lora_B_in,
                                                  double scale, const c10::optional<at::Tensor>& candidate_in) {
  const char* op = "selora_forward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto [x, weight, lora_A, lora_B, M, in, out, r] = checked_operands(op, x_in, weight_in, lora_A_in, lora_B_in);
  const c10::cuda::CUDAGuard guard(x.device());
  c10::optional<at::Tensor> bias;
  if (bias_in.has_value()) bias = operand(op, "bias", *bias_in, {out}, x);

  // u = x [A; K]ᵀ while a candidate is tested: one product reads x once for both.
  const at::Tensor rows =
      candidate_in.has_value() ? at::cat({lora_A, operand(op, "candidate", *candidate_in, {in}, x).unsqueeze(0)}) : lora_A;
  at::Tensor u = new_output({M, rows.size(0)}, x.options());
  at::mm_out(u, x, rows.t());
  at::Tensor y = new_output({M, out}, x.options());
  if (M > in) {
    linear_into(y, x, at::addmm(weight, lora_B, lora_A, 1, scale), bias);
  } else {
    linear_into(y, x, weight, bias);
    y.addmm_(u.narrow(1, 0, r), lora_B.t(), 1, scale);
  }
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> selora_backward(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& lora_A_in,
    const at::Tensor& lora_B_in, const at::Tensor& u_in, double scale, int64_t n_samples, const std::string& fisher,
    bool need_grad_x) {
  const char* op = "selora_backward";
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto [x, weight, lora_A, lora_B, M, in, out, r] = checked_operands(op, x_in, weight_in, lora_A_in, lora_B_in);
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(fisher.empty() || fisher == "sample" || fisher == "batch", op, ": fisher must be \"\", \"sample\" or ",
              "\"batch\", got \"", fisher, "\"");
  const bool tracking = !fisher.empty();
  const at::Tensor grad_y = operand(op, "grad_y", grad_y_in, {M, out}, x);
  const at::Tensor u = operand(op, "u", u_in, {M, r + tracking}, x);
  TORCH_CHECK(n_samples >= 1 && M % n_samples == 0, op, ": n_samples = ", n_samples, " does not divide the ", M,
              " rows of x");

  const at::Tensor v = at::mm(grad_y, lora_B);  // [M, r]: the gradient reaching u, before the scale
  at::Tensor grad_x;
  if (need_grad_x) {
    grad_x = new_output({M, in}, x.options());
    if (M > out) {
      at::mm_out(grad_x, grad_y, at::addmm(weight, lora_B, lora_A, 1, scale));
    } else {
      at::mm_out(grad_x, grad_y, weight);
      grad_x.addmm_(v, lora_A, 1, scale);
    }
  }
  at::Tensor grad_A = new_output({r, in}, x.options());
  at::Tensor grad_B = new_output({out, r}, x.options());
  if (fisher != "sample") {
    grad_A.addmm_(v.t(), x, 0, scale);  // beta = 0: the poisoned contents are never read
    if (!tracking) {
      grad_B.addmm_(grad_y.t(), u, 0, scale);
      return {grad_x, grad_A, grad_B, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor grad_B_new = at::mm(grad_y.t(), u).mul_(scale);  // [out, r + 1]: grad B and G_new
    grad_B.copy_(grad_B_new.narrow(1, 0, r));
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    return {grad_x, grad_A, grad_B, at::Tensor(), at::Tensor(), at::Tensor(), grad_B_new.select(1, r).to(acc)};
  }

  const auto fisher_options = x.options().dtype(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor fisher_A = new_output({r, in}, fisher_options);
  at::Tensor fisher_B = new_output({out, r}, fisher_options);
  at::Tensor grad_new = new_output({out}, fisher_options);
  at::Tensor fisher_new_per_out = at::empty({out}, fisher_options);
  per_sample_grad_fisher(grad_y, u, r, n_samples, scale, /*q_major=*/false, grad_B, fisher_B, grad_new,
                         fisher_new_per_out);
  per_sample_grad_fisher(x, v, r, n_samples, scale, /*q_major=*/true, grad_A, fisher_A, c10::nullopt, c10::nullopt);
  return {grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new_per_out.sum(), grad_new};
}

// The Fisher kernels alone (for benchmarks): grad, fisher [n, q_main] and, when Q has one more column,
// the candidate's grad_extra, fisher_extra [n].
std::vector<at::Tensor> fisher_kernels(const at::Tensor& P, const at::Tensor& Q, int64_t q_main, int64_t n_samples,
                                       double scale) {
  TORCH_CHECK(P.is_cuda() && P.dim() == 2 && Q.dim() == 2 && P.size(0) == Q.size(0) && Q.scalar_type() == P.scalar_type()
              && P.device() == Q.device() && n_samples >= 1 && P.size(0) % n_samples == 0, "fisher_kernels: P [M, n] "
              "and Q [M, q] of one dtype on one CUDA device, with n_samples dividing M");
  const c10::cuda::CUDAGuard guard(P.device());
  const auto acc = P.options().dtype(P.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  const int64_t n = P.size(1);
  at::Tensor grad = new_output({n, q_main}, P.options()), fisher = new_output({n, q_main}, acc);
  c10::optional<at::Tensor> grad_extra, fisher_extra;
  if (Q.size(1) > q_main) {
    grad_extra = new_output({n}, acc);
    fisher_extra = new_output({n}, acc);
  }
  per_sample_grad_fisher(P.contiguous(), Q.contiguous(), q_main, n_samples, scale, false, grad, fisher, grad_extra,
                         fisher_extra);
  std::vector<at::Tensor> outputs{grad, fisher};
  if (grad_extra) outputs.insert(outputs.end(), {*grad_extra, *fisher_extra});
  return outputs;
}

py::dict plan_dict(int64_t n, int64_t q, int64_t tokens, int64_t samples, at::ScalarType dtype, int64_t sms) {
  const FisherPlan p = fisher_plan(n, q, tokens, samples, dtype, sms);
  py::dict d;
  d["tensor_cores"] = p.tensor_cores;
  d["qpt"] = p.qpt;
  d["tiles"] = p.tiles;
  d["slices"] = p.slices;
  d["runs"] = p.runs;
  d["run_len"] = p.run_len;
  d["vectorized"] = p.vectorized;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused SeLoRA linear op (forward, backward with per-sample Fisher terms) for CUDA tensors.";
  m.def("forward", &selora_forward, "(y, u) = SeLoRA forward", py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("scale"), py::arg("candidate"));
  m.def("backward", &selora_backward, "(grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new)",
        py::arg("grad_y"), py::arg("x"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("u"),
        py::arg("scale"), py::arg("n_samples"), py::arg("fisher"), py::arg("need_grad_x"));
  m.def("fisher_kernels", &fisher_kernels, "Debug: the per-sample Fisher kernels alone: [grad, fisher(, grad_extra, "
        "fisher_extra)]", py::arg("P"), py::arg("Q"), py::arg("q_main"), py::arg("n_samples"), py::arg("scale"));
  m.def("fisher_plan", &plan_dict, "How the Fisher kernels split an [M = samples·tokens, n] × [M, q] problem on a GPU "
        "with `multiprocessors` SMs: the launch branch taken", py::arg("n"), py::arg("q"), py::arg("tokens"),
        py::arg("samples"), py::arg("dtype"), py::arg("multiprocessors"));
  m.def("set_poison", [](bool on) { poison_outputs = on; },
        "Debug: fill every output with NaN before it is computed, so elements left unwritten show.",
        py::arg("on"));
}
