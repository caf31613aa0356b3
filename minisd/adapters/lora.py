"""LoRA on a frozen nn.Linear (or a 1×1 nn.Conv2d, a Linear over channels), and what every adapter shares.

y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with A [r, in] Kaiming-uniform, B [out, r] zeros, s = alpha / r (PEFT/kohya).
The adapter keeps the base's own `weight` and `bias` Parameters, so the base's state-dict keys do not
change, and adds `lora_A` / `lora_B` next to them.
"""
import math

import torch
from torch import nn

from .op import selora_forward


class AdapterLayer(nn.Module):
    """A frozen base layer whose input rows (tokens, or pixels of a 1×1 conv) go through an adapted linear map."""

    def __init__(self, base):
        super().__init__()
        if isinstance(base, nn.Conv2d):
            if base.kernel_size != (1, 1) or base.stride != (1, 1) or base.padding != (0, 0) or base.groups != 1:
                raise ValueError(f"only a plain 1x1 convolution can be adapted, got {base}")
            self.in_features, self.out_features = base.in_channels, base.out_channels
        elif isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"cannot adapt {type(base).__name__}")
        self.is_conv = isinstance(base, nn.Conv2d)
        self.weight = base.weight.requires_grad_(False)
        self.register_parameter("bias", None if base.bias is None else base.bias.requires_grad_(False))

    def new_param(self, *shape):
        """An empty trainable tensor beside the base weight: fp32 (fp64 for an fp64 base), whatever the base's half dtype."""
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return nn.Parameter(torch.empty(*shape, device=self.weight.device, dtype=dtype))

    def init_lora(self, rank):
        """lora_A [rank, in] Kaiming-uniform (a=√5, as peft) and lora_B [out, rank] zeros: no change at start."""
        self.lora_A = self.new_param(rank, self.in_features)
        self.lora_B = self.new_param(self.out_features, rank)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x):
        n_samples = x.shape[0] if x.dim() > 1 else 1
        if self.is_conv:  # [N, C, H, W] -> rows [N·H·W, C], sample-major
            b, _, h, w = x.shape
            y = self.forward_rows(x.permute(0, 2, 3, 1).reshape(-1, self.in_features), n_samples)
            return y.view(b, h, w, self.out_features).permute(0, 3, 1, 2).contiguous()
        y = self.forward_rows(x.reshape(-1, self.in_features), n_samples)
        return y.view(*x.shape[:-1], self.out_features)

    def base_weight(self):
        return self.weight.flatten(1) if self.is_conv else self.weight

    def lora_pair(self):
        """(A, B, scale) of the plain LoRA equal to this adapter: what files store and merge folds in."""
        return self.lora_A, self.lora_B, self.scale

    def plain_module(self):
        """The base nn.Linear / nn.Conv2d holding this layer's weight and bias (no adapter)."""
        bias = self.bias is not None
        if self.is_conv:
            module = nn.Conv2d(self.in_features, self.out_features, 1, bias=bias, device="meta")
        else:
            module = nn.Linear(self.in_features, self.out_features, bias=bias, device="meta")
        module.weight = self.weight
        module.bias = self.bias
        return module

    def extra_repr(self):
        kind = "conv1x1" if self.is_conv else "linear"
        return f"{kind} in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def compute_dtype(x):
    """The dtype the layer computes in: autocast's for float inputs under autocast (as nn.Linear), else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return x.dtype


def lora_rows(layer, x, lora_A, lora_B, scale):
    """y = x Wᵀ + b + s (x Aᵀ) Bᵀ on rows x [M, in], differentiable, in the layer's compute dtype."""
    dtype = compute_dtype(x)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    y, _ = selora_forward(x.to(dtype), layer.base_weight().to(dtype), bias, lora_A.to(dtype), lora_B.to(dtype), scale)
    return y


class LoRALinear(AdapterLayer):
    """Fixed-rank LoRA."""

    def __init__(self, base, rank=4, alpha=1.0):
        super().__init__(base)
        self.scale = alpha / rank if rank > 0 else 0.0
        self.init_lora(rank)

    @property
    def rank(self):
        return self.lora_A.shape[0]

    def forward_rows(self, x, n_samples):
        return lora_rows(self, x, self.lora_A, self.lora_B, self.scale)
