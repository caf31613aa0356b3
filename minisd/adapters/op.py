"""The SeLoRA linear op in plain PyTorch: the CPU path and the reference the CUDA kernel must equal.

Rows of x are the tokens of all samples, flattened sample-major: x [M, in] with M = n_samples · T.
    forward   y = x Wᵀ + b + s·(u Bᵀ),  u = x Aᵀ; while a candidate A row K is tested, u = x [A; K]ᵀ
              carries p = x·K as one more column (x is read once for both)
    backward  grad x, grad A, grad B and, while a candidate is tested, the gradient of its zero B column
              G_new = s Σ_t p_t g_t and either the per-sample Fisher terms (`fisher="sample"`)
              F_A = Σ_i G_A,i²,  F_B = Σ_i G_B,i²,  F_new = Σ_i Σ_o G_new,i[o]²
              with the true per-sample gradients of sample i (its T rows):
              G_A,i = s Σ_t (Bᵀ g_t) x_tᵀ,  G_B,i = s Σ_t g_t u_tᵀ,  G_new,i[o] = s Σ_t p_t g_t[o],
              or none of them (`fisher="batch"`: the caller squares the step's summed gradients).
The FI-ratio (F_A + F_B + F_new) / (F_A + F_B) does not depend on constant factors common to all
terms (s², a loss scale, 1/N of a mean loss), so any of them may be dropped by a faster kernel.
"""
import torch
import torch.nn.functional as F

FISHER_MODES = (None, "sample", "batch")


def selora_forward(x, weight, bias, lora_A, lora_B, scale, candidate=None):
    """y [M, out] and u = x Aᵀ [M, r] (kept for backward); with a candidate K [in], u = x [A; K]ᵀ [M, r + 1]."""
    rows = lora_A if candidate is None else torch.cat([lora_A, candidate.to(lora_A)[None]])
    u = F.linear(x, rows)
    y = F.linear(x, weight, bias) + scale * F.linear(u[:, :lora_A.shape[0]], lora_B)
    return y, u


def selora_backward(grad_y, x, weight, lora_A, lora_B, u, scale, n_samples, fisher, need_grad_x):
    """(grad_x or None, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new).

    fisher None: u is x Aᵀ and the last four are None. "batch": u holds p = x·K as its last column and
    grad_new [out] is G_new summed over all rows; the Fisher terms are None. "sample": also the
    per-sample Fisher terms. Fisher terms and grad_new are fp32 (fp64 for fp64 inputs)."""
    if fisher not in FISHER_MODES:
        raise ValueError(f"fisher must be one of {FISHER_MODES}, got {fisher!r}")
    r = lora_A.shape[0]
    u_main = u[:, :r]
    grad_u = grad_y @ lora_B  # [M, r], the gradient reaching u before the scale
    grad_A = scale * (grad_u.t() @ x)
    grad_B = scale * (grad_y.t() @ u_main)
    grad_x = grad_y @ weight + scale * (grad_u @ lora_A) if need_grad_x else None
    if fisher is None:
        return grad_x, grad_A, grad_B, None, None, None, None

    # Per-sample sums over the T tokens as batched products [N, ·, T] @ [N, T, ·]: no per-token outer
    # products. Half inputs accumulate in fp32.
    acc = torch.promote_types(x.dtype, torch.float32)
    g = grad_y.to(acc)
    p = u[:, r].to(acc)
    grad_new = scale * (p @ g)  # [out]
    if fisher == "batch":
        return grad_x, grad_A, grad_B, None, None, None, grad_new
    n, T = n_samples, x.shape[0] // n_samples  # T given: a layer of width 0 has nothing to infer it from
    g = g.reshape(n, T, grad_y.shape[-1])  # [N, T, out]
    xs = x.to(acc).reshape(n, T, x.shape[-1])  # [N, T, in]
    us = u_main.to(acc).reshape(n, T, r)  # [N, T, r]
    gu = g @ lora_B.to(acc)  # [N, T, r]
    fisher_A = (scale * (gu.transpose(1, 2) @ xs)).square().sum(0)  # [r, in]
    fisher_B = (scale * (g.transpose(1, 2) @ us)).square().sum(0)  # [out, r]
    ps = p.reshape(n, 1, -1)  # [N, 1, T]
    fisher_new = (scale * (ps @ g)).square().sum()  # scalar
    return grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new
