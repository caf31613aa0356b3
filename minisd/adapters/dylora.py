"""DyLoRA (Valipour et al., 2023): nested-dropout LoRA, trained at a random rank b ≤ r_max each step.

Forward at rank b uses the first b rows of A and columns of B with the paper's scale alpha / b, so each
truncation is a LoRA of rank b in the usual convention:  y = x Wᵀ + b₀ + (alpha/b)·(x A[:b]ᵀ) B[:, :b]ᵀ.
Choices where the paper leaves room:
- one b per step for all layers (`sample_dylora_rank`), drawn uniformly from 1..r_max;
- all first b ranks train at that step (the paper's "not frozen" mode; its "frozen" mode updates only
  rank b). Rows beyond b get zero gradient for that step.
- eval uses `active_rank` (default r_max, the full adapter; files and merges store all r_max ranks).
"""

import torch

from .lora import AdapterLayer, lora_rows


class DyLoRALinear(AdapterLayer):
    def __init__(self, base, rank=4, alpha=1.0):
        super().__init__(base)
        self.max_rank, self.alpha = rank, alpha
        self.active_rank = rank
        self.init_lora(rank)

    @property
    def rank(self):
        return self.max_rank

    @property
    def scale(self):
        """The scale of the full adapter, alpha / r_max (of the active truncation: alpha / active_rank)."""
        return self.alpha / self.max_rank

    def forward_rows(self, x, n_samples):
        b = self.active_rank
        return lora_rows(self, x, self.lora_A[:b], self.lora_B[:, :b], self.alpha / b)


def set_dylora_rank(layers, rank=None):
    """Truncate every DyLoRA layer to `rank` (None: its full r_max)."""
    for layer in layers:
        layer.active_rank = layer.max_rank if rank is None else min(rank, layer.max_rank)


def sample_dylora_rank(layers, generator):
    """Draw this step's b uniformly from 1..r_max (one b for all layers) and set it; returns b."""
    layers = list(layers)
    r_max = max(layer.max_rank for layer in layers)
    b = int(torch.randint(1, r_max + 1, (), generator=generator))
    set_dylora_rank(layers, b)
    return b
