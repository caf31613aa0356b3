"""Putting adapters into a model, naming them, and folding them back into plain layers.

Adapters go into every nn.Linear of the U-Net and the text encoder (optionally the U-Net's 1×1
`proj_in`/`proj_out` convs); every base parameter is frozen and the VAE is never adapted. Layers are
named by their key in the original single-file checkpoint: minisd.checkpoint.names.PREFIXES[part] + module path
(a chest-X-ray LDM's layers take the same prefixes before its own module paths).
"""
import torch
from torch import nn

from ..checkpoint.names import PREFIXES
from ..errors import MinisdError
from .adalora import AdaLoRALinear
from .dylora import DyLoRALinear
from .lora import AdapterLayer, LoRALinear
from .selora import SeLoRALinear

METHODS = ("lora", "selora", "dylora", "adalora")
PARTS = ("unet", "text_encoder")


def make_layer(method, base, rank, alpha):
    """The adapter of `method` around `base`. rank: LoRA's r, DyLoRA's r_max, AdaLoRA's target (it starts
    at 3·rank//2 triplets, 6 for 4, peft's 12→8 ratio); SeLoRA ignores it and starts at 1."""
    if method == "lora":
        return LoRALinear(base, rank, alpha)
    if method == "selora":
        return SeLoRALinear(base, alpha)
    if method == "dylora":
        return DyLoRALinear(base, rank, alpha)
    if method == "adalora":
        return AdaLoRALinear(base, max(rank, 3 * rank // 2), alpha)
    raise MinisdError(f"unknown adapter method {method!r}: choose one of {', '.join(METHODS)}")


def adaptable(name, module, convs=True):
    """Whether `module` (at `name` in the U-Net or text encoder) is a layer adapters go into."""
    if isinstance(module, nn.Linear):
        return True
    leaf = name.rsplit(".", 1)[-1]
    return convs and isinstance(module, nn.Conv2d) and leaf in ("proj_in", "proj_out") and module.kernel_size == (1, 1)


def replace_module(root, name, module):
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def freeze(sd):
    for part in (*PARTS, "vae"):
        model = getattr(sd, part, None)
        if model is not None:
            model.requires_grad_(False)


def inject(sd, method="selora", rank=4, alpha=1.0, convs=False, text_encoder=True):
    """Replace the adaptable layers of sd.unet (and sd.text_encoder) with `method`'s adapter; freeze the rest.
    Returns {"method", "layers": {part: count}, "trainable_params"}."""
    if method not in METHODS:
        raise MinisdError(f"unknown adapter method {method!r}: choose one of {', '.join(METHODS)}")
    if rank < 1:
        raise MinisdError(f"--rank must be at least 1, got {rank}")
    if adapted_layers(sd):
        raise MinisdError("the model already has adapters; inject into a fresh base model")
    freeze(sd)
    counts = {}
    for part in PARTS if text_encoder else PARTS[:1]:
        root = getattr(sd, part)
        targets = [(name, m) for name, m in root.named_modules() if adaptable(name, m, convs)]
        for name, module in targets:
            replace_module(root, name, make_layer(method, module, rank, alpha))
        counts[part] = len(targets)
    trainable = sum(p.numel() for layer in adapted_layers(sd).values() for p in layer.parameters() if p.requires_grad)
    return {"method": method, "layers": counts, "trainable_params": trainable}


def adapted_layers(sd):
    """{full original-checkpoint name: adapter layer} in model order, U-Net first."""
    return {PREFIXES[part] + name: m for part in PARTS for name, m in getattr(sd, part).named_modules()
            if isinstance(m, AdapterLayer)}


@torch.no_grad()
def merge(sd):
    """Fold every adapter into its base weight (W += s·B A) and put the plain nn.Linear / nn.Conv2d back."""
    for part in PARTS:
        root = getattr(sd, part)
        for name, layer in [(n, m) for n, m in root.named_modules() if isinstance(m, AdapterLayer)]:
            A, B, scale = layer.lora_pair()
            delta = scale * (B.double() @ A.double())
            layer.weight.add_(delta.view_as(layer.weight).to(layer.weight.dtype))
            replace_module(root, name, layer.plain_module())
