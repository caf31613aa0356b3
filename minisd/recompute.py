"""Gradient checkpointing: a block recomputed in backward instead of storing its activations."""
import torch
from torch.utils.checkpoint import checkpoint


def run(network, block, *args, **kwargs):
    """block(*args, **kwargs), recomputed in backward when `network` trains with gradient checkpointing. The
    networks draw no random numbers (no dropout), so no RNG state is saved for the recomputation: that saves a
    generator read per block and keeps the block capturable in a CUDA graph."""
    if network.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return block(*args, **kwargs)
