"""The SeLoRA linear op in plain PyTorch: the CPU path and the reference the CUDA kernel must equal.

Rows of x are the tokens of all samples, flattened sample-major: x [M, in] with M = n_samples · T.
    forward   y = x Wᵀ + b + s·(u Bᵀ),  u = x Aᵀ
    backward  grad x, grad A, grad B and, when a candidate column K is given, the per-sample Fisher terms
              F_A = Σ_i G_A,i²,  F_B = Σ_i G_B,i²,  F_new = Σ_i Σ_o G_new,i[o]²
              with the true per-sample gradients of sample i (its T rows):
              G_A,i = s Σ_t (Bᵀ g_t) x_tᵀ,  G_B,i = s Σ_t g_t u_tᵀ,  G_new,i[o] = s Σ_t (x_t·K) g_t[o]
              (G_new is the gradient of a new, zero B column paired with A row K).
The FI-ratio (F_A + F_B + F_new) / (F_A + F_B) does not depend on constant factors common to all
terms (s², a loss scale, 1/N of a mean loss), so any of them may be dropped by a faster kernel.
"""
import torch
import torch.nn.functional as F


def selora_forward(x, weight, bias, lora_A, lora_B, scale):
    """y [M, out] and u = x Aᵀ [M, r] (kept for backward)."""
    u = F.linear(x, lora_A)
    y = F.linear(x, weight, bias) + scale * F.linear(u, lora_B)
    return y, u


def selora_backward(grad_y, x, weight, lora_A, lora_B, u, scale, n_samples, candidate, need_grad_x):
    """(grad_x or None, grad_A, grad_B, fisher_A, fisher_B, fisher_new); Fisher terms are None when candidate is None."""
    grad_u = grad_y @ lora_B  # [M, r], the gradient reaching u before the scale
    grad_A = scale * (grad_u.t() @ x)
    grad_B = scale * (grad_y.t() @ u)
    grad_x = grad_y @ weight + scale * (grad_u @ lora_A) if need_grad_x else None
    if candidate is None:
        return grad_x, grad_A, grad_B, None, None, None

    # Per-sample sums over the T tokens as batched products [N, ·, T] @ [N, T, ·]: no per-token outer
    # products. Half inputs accumulate in fp32.
    acc = torch.promote_types(x.dtype, torch.float32)
    n = n_samples
    g = grad_y.to(acc).reshape(n, -1, grad_y.shape[-1])  # [N, T, out]
    xs = x.to(acc).reshape(n, -1, x.shape[-1])  # [N, T, in]
    us = u.to(acc).reshape(n, -1, u.shape[-1])  # [N, T, r]
    gu = g @ lora_B.to(acc)  # [N, T, r]
    fisher_A = (scale * (gu.transpose(1, 2) @ xs)).square().sum(0)  # [r, in]
    fisher_B = (scale * (g.transpose(1, 2) @ us)).square().sum(0)  # [out, r]
    xk = (xs @ candidate.to(acc)).unsqueeze(1)  # [N, 1, T]
    fisher_new = (scale * (xk @ g)).square().sum()  # scalar
    return grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new
