"""The adapter file: one .safetensors with `<layer>.lora_A` [r, in] / `<layer>.lora_B` [out, r] per adapted layer
(layer = its name in the original single-file checkpoint) and JSON metadata.

Every method is stored as its equivalent plain LoRA (AdaLoRA: B = P, A = Λ·Q over its live triplets;
DyLoRA: all r_max ranks), so any adapter loads for inference as a per-layer-rank LoRA with the stored scale.
Metadata (all strings): format, format_version, method, alpha, scale, ranks {layer: r}, fingerprint of the
base model, args (training arguments, the data split's data_seed among them), rank_history (SeLoRA growth
events); train.py adds step and val_loss (the step the file was saved at and its validation loss).
"""
import hashlib
import json
import math
import os
import warnings

import torch
from safetensors import SafetensorError, safe_open

from ..checkpoint.files import all_finite, atomic_save
from ..checkpoint.names import PREFIXES
from ..errors import MinisdError
from .inject import METHODS, PARTS, adaptable, adapted_layers, freeze, replace_module
from .lora import AdapterLayer, LoRALinear

FORMAT = "minisd-adapter"
FORMAT_VERSION = 1
REQUIRED = ("format", "format_version", "method", "alpha", "scale", "ranks", "fingerprint")


def fingerprint(sd):
    """sha256 over the adaptable layers' names, shapes and the signs of 64 weights each. Cheap (no pass over
    the weights), unchanged by injection and by the dtype the base is loaded in, different for another base."""
    h = hashlib.sha256()
    for part in PARTS:
        for name, module in getattr(sd, part).named_modules():
            if isinstance(module, AdapterLayer) or adaptable(name, module):
                w = module.weight.detach().flatten()
                picks = torch.linspace(0, w.numel() - 1, 64, device=w.device).long()
                h.update(f"{PREFIXES[part]}{name}:{list(module.weight.shape)}:".encode())
                h.update(w[picks].signbit().cpu().numpy().tobytes())
    return h.hexdigest()


def save_adapter(path, sd, method, alpha, args=None, rank_history=None, **extra):
    """Write sd's adapters to `path` atomically (temp file + rename), with `extra` JSON metadata fields.
    Layers of rank 0 are left out."""
    if method not in METHODS:
        raise MinisdError(f"unknown adapter method {method!r}: choose one of {', '.join(METHODS)}")
    layers = adapted_layers(sd)
    if not layers:
        raise MinisdError("the model has no adapters to save")
    tensors, ranks, scales = {}, {}, set()
    for name, layer in layers.items():
        A, B, scale = layer.lora_pair()
        scales.add(scale)
        if A.shape[0] == 0:
            continue
        ranks[name] = A.shape[0]
        tensors[f"{name}.lora_A"] = A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = B.detach().cpu().contiguous()
    if len(scales) != 1:
        raise ValueError(f"adapters with different scales {sorted(scales)} cannot share one file")
    write_adapter(path, tensors, method, alpha, scales.pop(), ranks, fingerprint(sd), args, rank_history, **extra)


def write_adapter(path, tensors, method, alpha, scale, ranks, base_fingerprint, args=None, rank_history=None, **extra):
    """The file itself: `<layer>.lora_A/B` tensors and the metadata every reader expects (plus `extra`
    JSON fields), written atomically."""
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "method": method,
        "alpha": json.dumps(alpha), "scale": json.dumps(scale), "ranks": json.dumps(ranks),
        "fingerprint": base_fingerprint, "args": json.dumps(args or {}, default=str),
        "rank_history": json.dumps(rank_history or []),
        **{key: json.dumps(value) for key, value in extra.items()},
    }
    atomic_save(tensors, path, metadata)


def read_adapter(path):
    """(tensors, metadata as Python values) of an adapter file, checked for form but not against a model."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MinisdError(f"{path}: no such adapter file")
    try:
        with safe_open(path, "pt") as f:
            raw = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except SafetensorError as e:
        raise MinisdError(f"{path}: not a safetensors file ({e})") from None
    for key, t in tensors.items():   # a NaN or inf spreads to every image and every merged or folded weight
        if not t.is_floating_point():
            raise MinisdError(f"{path}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; adapter weights are "
                              f"floating point")
        if not all_finite(t):
            raise MinisdError(f"{path}: {key} holds non-finite values (NaN or inf); the adapter is broken")
    for field in REQUIRED:
        if field not in raw:
            raise MinisdError(f"{path}: not a minisd adapter file (metadata field {field!r} missing)")
    if raw["format"] != FORMAT:
        raise MinisdError(f"{path}: metadata format is {raw['format']!r}, expected {FORMAT!r}")
    try:
        meta = {key: json.loads(value) for key, value in raw.items() if key not in ("format", "method", "fingerprint")}
    except (json.JSONDecodeError, RecursionError) as e:
        raise MinisdError(f"{path}: malformed metadata ({e})") from None
    meta.update(format=raw["format"], method=raw["method"], fingerprint=raw["fingerprint"])
    problem = metadata_problem(meta)
    if problem:
        raise MinisdError(f"{path}: malformed metadata: {problem}")
    if meta["format_version"] > FORMAT_VERSION:
        raise MinisdError(f"{path}: format version {meta['format_version']} is newer than this minisd reads ({FORMAT_VERSION})")
    if meta["method"] not in METHODS:
        raise MinisdError(f"{path}: unknown adapter method {meta['method']!r}")
    return tensors, meta


def metadata_problem(meta):
    """What is wrong with the types of an adapter's metadata values (JSON decoded), or None."""
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number(meta["format_version"]) and meta["format_version"] >= 1):
        return f"format_version {meta['format_version']!r} is not a version number"
    for field in ("alpha", "scale"):
        if not (number(meta[field]) and math.isfinite(meta[field])):
            return f"{field} {meta[field]!r} is not a finite number"
    ranks = meta["ranks"]
    if not isinstance(ranks, dict):
        return f"ranks is a {type(ranks).__name__}, not {{layer: rank}}"
    for name, rank in ranks.items():
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0):
            return f"the rank of {name} is {rank!r}, not a whole number"
    for field, kind in (("args", dict), ("rank_history", list), ("merge", dict)):
        if meta.get(field) is not None and not isinstance(meta[field], kind):
            return f"{field} is a {type(meta[field]).__name__}, not a {kind.__name__}"
    return None


def _find_layer(sd, path, name):
    """(part, module path, base module) of the layer `name`, or an error naming it."""
    for part in PARTS:
        prefix = PREFIXES[part]
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        try:
            module = getattr(sd, part).get_submodule(local)
        except AttributeError:
            break
        if isinstance(module, AdapterLayer):
            raise MinisdError(f"{path}: the model already has an adapter at {name}; load onto a base model")
        if not adaptable(local, module):
            raise MinisdError(f"{path}: layer {name} is a {type(module).__name__}, which adapters do not go into")
        return part, local, module
    raise MinisdError(f"{path}: layer {name} is not in the model")


def load_adapter(sd, path):
    """Put the adapter file's layers into sd as LoRA layers of the stored ranks and scale; returns the metadata.
    Everything is checked before the model is touched; a fingerprint mismatch only warns."""
    tensors, meta = read_adapter(path)
    path, ranks = os.fspath(path), meta["ranks"]
    if not ranks:   # loading it would change nothing, without a word
        raise MinisdError(f"{path}: the adapter has no layers")
    pairs = {}
    for key, t in tensors.items():
        name, _, kind = key.rpartition(".")
        if kind not in ("lora_A", "lora_B") or not name:
            raise MinisdError(f"{path}: unexpected key {key} (expected <layer>.lora_A / <layer>.lora_B)")
        if name not in ranks:
            raise MinisdError(f"{path}: layer {name} has tensors but no rank in the metadata")
        pairs.setdefault(name, {})[kind] = t
    plan = []
    for name, rank in ranks.items():
        pair = pairs.get(name, {})
        for kind in ("lora_A", "lora_B"):
            if kind not in pair:
                raise MinisdError(f"{path}: layer {name} has no {kind}")
        part, local, module = _find_layer(sd, path, name)
        n_in = module.in_features if hasattr(module, "in_features") else module.in_channels
        n_out = module.out_features if hasattr(module, "out_features") else module.out_channels
        for kind, expected in (("lora_A", [rank, n_in]), ("lora_B", [n_out, rank])):
            if list(pair[kind].shape) != expected:
                raise MinisdError(f"{path}: layer {name}: {kind} has shape {list(pair[kind].shape)}, "
                                  f"the model expects {expected}")
        plan.append((part, local, module, rank, pair))
    if meta["fingerprint"] != fingerprint(sd):
        warnings.warn(f"{path}: the adapter was trained on a different base model (fingerprint mismatch)")
    freeze(sd)
    for part, local, module, rank, pair in plan:
        layer = LoRALinear(module, rank, meta["alpha"])
        layer.scale = meta["scale"]
        with torch.no_grad():
            layer.lora_A.copy_(pair["lora_A"])
            layer.lora_B.copy_(pair["lora_B"])
        replace_module(getattr(sd, part), local, layer)
    return meta
