"""Adapters in other tools: kohya / AUTOMATIC1111 / ComfyUI and diffusers / peft LoRA files, and an adapter
folded into a complete single-file checkpoint.

kohya (one .safetensors): `lora_unet_<diffusers module path, . -> _>` and `lora_te_<CLIP module path, . -> _>`,
each with `.lora_down.weight` = A [r, in] ([r, in, 1, 1] for a 1×1 conv), `.lora_up.weight` [out, r] and `.alpha`
(fp32 scalar); a reader applies alpha / r · up · down.

diffusers (what `StableDiffusionPipeline.save_lora_weights` writes and `load_lora_weights` reads):
`unet.<diffusers module path>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<CLIP module path>.lora_…`,
with peft's LoraConfig per component in the `lora_adapter_metadata` JSON metadata.
"""
import collections
import json
import os

import torch

from .adapters import load_adapter, merge, read_adapter
from .adapters.inject import PARTS
from .checkpoint.files import atomic_save
from .checkpoint.names import PREFIXES, to_diffusers_name
from .checkpoint.writing import save_single_file
from .config import CONFIGS
from .errors import MinisdError
from .model import StableDiffusion

# Module paths map through a config only for the number of res blocks per level, 2 in every SD-1.5 model.
NAMING_CONFIG = CONFIGS["sd15"]
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"   # the file load_lora_weights looks for in a folder
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def read_pairs(path):
    """({layer: (A [r, in], B [out, r])}, metadata) of an adapter file, every pair checked against its rank."""
    tensors, meta = read_adapter(path)
    if not meta["ranks"]:
        raise MinisdError(f"{path}: the adapter has no layers")
    pairs = {}
    for name, rank in meta["ranks"].items():
        A, B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if A is None or B is None:
            raise MinisdError(f"{path}: layer {name} has no {'lora_A' if A is None else 'lora_B'}")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise MinisdError(f"{path}: layer {name}: lora_A {list(A.shape)} and lora_B {list(B.shape)} "
                              f"do not hold rank {rank}")
        pairs[name] = (A, B)
    return pairs, meta


def adapter_layers(path):
    """[(part, diffusers module path, A, B, scale, is_conv)] of an adapter file."""
    pairs, meta = read_pairs(path)
    layers = []
    for name, (A, B) in pairs.items():
        part = next((p for p in PARTS if name.startswith(PREFIXES[p])), None)
        if part is None:
            raise MinisdError(f"{path}: layer {name} is neither in the U-Net nor in the text encoder")
        local = name[len(PREFIXES[part]):]
        if part == "text_encoder" and not local.startswith("text_model."):
            raise MinisdError(f"{path}: layer {name} is not a layer of SD-1.5's CLIP text encoder")
        try:
            module = to_diffusers_name(part, local + ".weight", NAMING_CONFIG).removesuffix(".weight")
        except (AttributeError, KeyError, ValueError):   # the name fits none of the U-Net's naming rules
            raise MinisdError(f"{path}: layer {name} is not a layer of the SD-1.5 U-Net") from None
        # Adapters go into Linear layers and, in the U-Net, the 1×1 proj_in / proj_out convs only.
        is_conv = part == "unet" and local.rsplit(".", 1)[-1] in ("proj_in", "proj_out")
        layers.append((part, module, A, B, meta["scale"], is_conv))
    return layers, meta


def as_conv(weight, is_conv):
    return weight[:, :, None, None] if is_conv else weight


def export_kohya(adapter_path, out):
    """Write the adapter as a kohya-style LoRA (AUTOMATIC1111, ComfyUI and diffusers read it). Returns `out`."""
    layers, meta = adapter_layers(adapter_path)
    ranks = [A.shape[0] for _, _, A, *_ in layers]
    common = collections.Counter(ranks).most_common(1)[0][0]
    # One alpha for every layer, scale·r of the most common rank; a layer of another rank r carries r / common in
    # lora_up, so that every reader's alpha / r · up · down is scale · B A. (Per-layer alphas would be kohya's
    # own choice, but diffusers 0.42 applies the alphas of attention projections only when all alphas are equal.)
    alpha = meta["scale"] * common
    tensors = {}
    for part, module, A, B, scale, is_conv in layers:
        key = KOHYA_PREFIXES[part] + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = as_conv(A, is_conv)
        tensors[f"{key}.lora_up.weight"] = as_conv(B * (A.shape[0] / common), is_conv)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    dim = str(common) if len(set(ranks)) == 1 else "Dynamic"   # what kohya's resize_lora.py writes for per-layer ranks
    atomic_save(tensors, out, {"ss_network_module": "networks.lora", "ss_network_dim": dim,
                               "ss_network_alpha": str(alpha), "minisd_method": meta["method"]})
    return out


def export_diffusers(adapter_path, out):
    """Write the adapter as diffusers' LoRA file: `out` ending in .safetensors is that file, anything else a folder
    holding pytorch_lora_weights.safetensors. Returns the file written."""
    layers, meta = adapter_layers(adapter_path)
    # The scale goes into lora_B and every layer's lora_alpha is its rank (scale 1), the diffusers/peft convention
    # W + B A, so that a reader without the metadata (diffusers then derives r and alpha from the shapes) agrees.
    tensors, ranks = {}, {"unet": {}, "text_encoder": {}}
    for part, module, A, B, scale, is_conv in layers:
        tensors[f"{part}.{module}.lora_A.weight"] = as_conv(A, is_conv)
        tensors[f"{part}.{module}.lora_B.weight"] = as_conv(scale * B, is_conv)
        # CLIPTextModel lost its `text_model.` level in transformers 5: config names that match as a suffix fit both
        # (diffusers drops the prefix from the tensor keys itself).
        ranks[part][module.removeprefix("text_model.")] = A.shape[0]
    config = {}
    for part, part_ranks in ranks.items():
        if not part_ranks:
            continue
        r = collections.Counter(part_ranks.values()).most_common(1)[0][0]
        others = {module: rank for module, rank in part_ranks.items() if rank != r}
        for key, value in {"r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": others,
                           "target_modules": sorted(part_ranks), "lora_dropout": 0.0, "bias": "none"}.items():
            config[f"{part}.{key}"] = value
    out = os.fspath(out)
    if not out.endswith(".safetensors") and os.path.isfile(out):
        raise MinisdError(f"{out}: is a file; the diffusers export goes into a folder (or a name ending in .safetensors)")
    path = out if out.endswith(".safetensors") else os.path.join(out, DIFFUSERS_WEIGHT_NAME)
    atomic_save(tensors, path, {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True),
                                "minisd_method": meta["method"]})
    return path


def fold(sd, adapter_path, out, dtype=None):
    """Fold the adapter into sd's weights (sd is changed) and save a complete original-layout single file."""
    if not isinstance(sd, StableDiffusion):
        raise MinisdError(f"{sd.source}: is not an SD-1.5 model; fold writes SD-1.5's single-file layout")
    load_adapter(sd, adapter_path)
    merge(sd)
    save_single_file(sd, str(out), dtype)
    return out
