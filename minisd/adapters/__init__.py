"""Adapters for the U-Net and text encoder: LoRA, SeLoRA (rank grown by Fisher information), DyLoRA, AdaLoRA."""
from .adalora import AdaLoRAController, AdaLoRALinear
from .dylora import DyLoRALinear, sample_dylora_rank, set_dylora_rank
from .inject import METHODS, adapted_layers, inject, merge
from .io import fingerprint, load_adapter, read_adapter, save_adapter
from .lora import AdapterLayer, LoRALinear
from .op import selora_backward, selora_forward
from .selora import SeLoRAController, SeLoRALinear, grow_parameter

__all__ = [
    "AdaLoRAController", "AdaLoRALinear", "AdapterLayer", "DyLoRALinear", "LoRALinear", "METHODS",
    "SeLoRAController", "SeLoRALinear", "adapted_layers", "fingerprint", "grow_parameter", "inject",
    "load_adapter", "merge", "read_adapter", "sample_dylora_rank", "save_adapter", "selora_backward",
    "selora_forward", "set_dylora_rank",
]
