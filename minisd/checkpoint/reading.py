"""Reading checkpoints: a path, folder or hub id resolved to an SD-1.5 single file or diffusers folder (or a
chest-X-ray LDM's folder), its tensors split into the three networks under our names, and every weight checked
against the model."""
import os
import re

import torch

from ..errors import MinisdError
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, all_finite, read_json, read_tensors, shard_files
from .foreign import diffusers_root, name_other_models, not_a_diffusers_folder
from .names import CXR_CLASS, CXR_UNET_CLASS, DIFFUSERS_FILES, KNOWN_EXTRAS, PART_NAMES, PREFIXES, normalize_diffusers_name, to_diffusers_name


def split_single_file(tensors, path):
    """Original single file -> per-part dicts with our names; unknown keys are an error."""
    name_other_models(tensors, path)
    parts = {part: {} for part in PREFIXES}
    for key, value in tensors.items():
        if KNOWN_EXTRAS.search(key):
            continue
        for part, prefix in PREFIXES.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                if part == "text_encoder" and not name.startswith("text_model."):
                    name = "text_model." + name
                if name in parts[part]:   # spelled both with and without `text_model.`
                    raise MinisdError(f"{path}: holds the weight {name!r} twice ({prefix + name!r} and "
                                      f"{prefix + name[len('text_model.'):]!r}); keep one")
                parts[part][name] = value
                break
        else:
            raise MinisdError(f"{path}: unexpected key {key!r}")
    if not any(parts.values()):
        raise MinisdError(f"{path}: no SD-1.5 weights found (keys like 'model.diffusion_model.…' expected)")
    missing = [f"no {PART_NAMES[part]} (keys '{PREFIXES[part]}…')" for part in PREFIXES if not parts[part]]
    if missing:
        raise MinisdError(f"{path}: has {' and '.join(missing)}; minisd needs U-Net, VAE and text encoder in one file")
    return parts


def find_part_files(folder, part):
    """(what to name in messages, weights files) of one diffusers part: a file, or the shards its index lists."""
    for name in DIFFUSERS_FILES[part]:
        path = os.path.join(folder, part, name)
        if os.path.exists(path):
            return path, [path]
        if os.path.exists(path + ".index.json"):
            return path + ".index.json", shard_files(path + ".index.json")
    raise MinisdError(f"{os.path.join(folder, part)}: no weights file (expected one of {', '.join(DIFFUSERS_FILES[part])}, "
                      "or a sharded one's .index.json)")


def read_diffusers_folder(folder, model):
    """Diffusers folder -> (per-part dicts with our names, mapped through `to_diffusers_name`;
    locate(part, name) -> (file, key) that names a weight as the folder holds it)."""
    parts, origins = {}, {}
    for part, module in model.parts().items():
        origin, files = find_part_files(folder, part)
        tensors = {}
        for path in files:
            for key, value in read_tensors(path).items():
                name = normalize_diffusers_name(part, key)
                if name in tensors:
                    raise MinisdError(f"{path}: {key!r} holds the same weight as another key ({name!r})")
                tensors[name] = value
        ours = {}
        for name in module.state_dict():
            theirs = to_diffusers_name(part, name, model.config)
            if theirs in tensors:
                ours[name] = tensors.pop(theirs)
        for key in tensors:
            if not KNOWN_EXTRAS.search(key):
                raise MinisdError(f"{origin}: unexpected key {key!r}")
        parts[part], origins[part] = ours, origin
    return parts, lambda part, name: (origins[part], to_diffusers_name(part, name, model.config))


def check_and_convert(parts, model, source, dtype, locate=None):
    """Every parameter present with the right shape and finite values, converted to dtype (the file's
    tensors are released as they are converted); VAE attention accepted as [C,C] or [C,C,1,1].
    locate(part, name) -> (file, key) names a weight in messages; by default the single-file key in `source`."""
    locate = locate or (lambda part, name: (source, PREFIXES[part] + name))
    return {part: check_part(part, module, parts.get(part, {}), dtype, locate) for part, module in model.parts().items()}


def check_part(part, module, given, dtype, locate):
    """check_and_convert for one part: `given` {name: tensor} against `module`'s state dict."""
    expected = module.state_dict()
    for name in given:
        if name not in expected:
            raise MinisdError("{}: unexpected key {!r}".format(*locate(part, name)))
    out = {}
    for name, ref in expected.items():
        file, key = locate(part, name)
        if name not in given:
            raise MinisdError(f"{file}: missing key {key!r}")
        original = given.pop(name)
        value = original
        if value.shape != ref.shape and value.numel() == ref.numel() and part == "vae" and ".attn_1." in name:
            value = value.reshape(ref.shape)
        if value.shape != ref.shape:
            raise MinisdError(f"{file}: {key!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if not value.is_floating_point():
            raise MinisdError(f"{file}: {key!r} has dtype {value.dtype}, expected floating point")
        value = value.to(dtype)
        if not all_finite(value):
            if bool(torch.isfinite(original).all()):
                raise MinisdError(f"{file}: {key!r} has values beyond {str(dtype).replace('torch.', '')} range (largest magnitude "
                                  f"{original.abs().max().item():.3g}); load the model in float32 or bfloat16")
            raise MinisdError(f"{file}: {key!r} holds NaN or infinite values (a broken checkpoint: it would give "
                              "black or noise images)")
        out[name] = value
    return out


HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors",
             "unet/diffusion_pytorch_model.safetensors.index.json", "unet/diffusion_pytorch_model-*-of-*.safetensors",
             "text_encoder/model.safetensors.index.json", "text_encoder/model-*-of-*.safetensors"]


def resolve_hub_id(repo_id, patterns=HUB_FILES, instead="--model PATH (a single .safetensors file or a diffusers folder)"):
    """The local folder of a hub model's files matching `patterns`: the huggingface cache first, then a download;
    offline and uncached is a clear error that says what to pass `instead`."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MinisdError(f"{repo_id!r} is not a local path, and huggingface_hub is not installed to fetch it") from None
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except Exception:
        pass
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise MinisdError(f"{repo_id!r}: no such local file or folder, and as a hub model it is not in the local huggingface "
                          f"cache and could not be downloaded ({type(e).__name__}); pass a local path: {instead}") from None


def class_name(path):
    """The `_class_name` a config file gives, or None (no file, or not one that says)."""
    try:
        return read_json(path, "").get("_class_name") if os.path.isfile(path) else None
    except MinisdError:
        return None


def is_cxr_folder(folder):
    """Whether `folder` is a chest-X-ray LDM's: its model_index.json, written last, names the class."""
    if class_name(os.path.join(folder, "model_index.json")) == CXR_CLASS:
        return True
    if class_name(os.path.join(folder, "unet", "config.json")) == CXR_UNET_CLASS:
        raise MinisdError(f"{folder}: a chest-X-ray LDM folder without its model_index.json, which is written last: "
                          "the writing of this folder was interrupted")
    return False


def read_checkpoint(source):
    """path | folder | hub id -> (kind, path): ("single", file), ("diffusers", folder) or ("cxr-ldm", folder)."""
    source = os.path.expanduser(os.fspath(source))
    if os.path.isdir(source):
        if is_cxr_folder(source):
            return "cxr-ldm", source
        if not os.path.isdir(os.path.join(source, "unet")):
            raise MinisdError(not_a_diffusers_folder(source))
        return "diffusers", source
    if os.path.exists(source):
        folder = os.path.dirname(os.path.abspath(source))
        if os.path.basename(source) == "model_index.json" and os.path.isdir(os.path.join(folder, "unet")):
            raise MinisdError(f"{source}: the index of a diffusers folder; pass the folder itself: {folder}")
        if diffusers_root(folder):
            raise MinisdError(f"{source}: one part of a diffusers folder; pass the folder itself: {diffusers_root(folder)}")
        if not source.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
            raise MinisdError(f"{source}: unknown checkpoint type (expected .safetensors, .ckpt or a diffusers folder)")
        return "single", source
    if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")) and not source.endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        return "diffusers", resolve_hub_id(source)
    raise MinisdError(f"{source}: no such file or folder (give a .safetensors file, a diffusers folder, a hub id or 'tiny')")
