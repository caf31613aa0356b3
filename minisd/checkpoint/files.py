"""Reading and writing weight and JSON files safely: every failure is one line naming the file.

Tensors come from .safetensors, or from pickled .ckpt/.pt/.bin files through torch.load(weights_only=True)
only; writes go through a temporary file and a rename, so a crash never leaves a half-written file.
"""
import json
import os
import re

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import MinisdError
from ..files import atomic_write
from .names import KNOWN_EXTRAS


SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def first_line(e):
    """The first sentence of an exception's message, for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]


def read_tensors(path):
    """The tensors of a .safetensors file (known extras left unread), or of a .ckpt/.pt/.bin read with
    torch.load(weights_only=True); a `state_dict` entry is unwrapped and non-tensor entries are dropped."""
    if not os.path.exists(path):
        raise MinisdError(f"{path}: no such file")
    if os.path.isdir(path):
        raise MinisdError(f"{path}: is a folder, expected a weights file")
    if os.path.getsize(path) == 0:
        raise MinisdError(f"{path}: is empty (0 bytes)")
    if path.lower().endswith(PICKLE_SUFFIXES):
        return read_pickle(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if not KNOWN_EXTRAS.search(k)}
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:
        raise MinisdError(f"{path}: not a readable safetensors file, or truncated ({first_line(e)})") from None


def read_pickle(path):
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except Exception as e:
        needs = re.findall(r"GLOBAL ([\w.]+)", str(e))   # torch names the first object it refused
        if needs:
            raise MinisdError(f"{path}: cannot be read weights-only: its pickle needs the Python object {needs[0]}, "
                              "and minisd never runs pickled code; convert it to .safetensors where you trust it") from None
        raise MinisdError(f"{path}: not a readable PyTorch checkpoint, or truncated ({first_line(e)})") from None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]   # Lightning checkpoints: {"state_dict": …, "global_step": …, "epoch": …}
    if not isinstance(obj, dict):
        raise MinisdError(f"{path}: holds a {type(obj).__name__}, not a state dict of named tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        entries = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:4])
        raise MinisdError(f"{path}: holds no tensors, so no state dict (entries: {entries or 'none'})")
    return tensors


def read_json(path, missing):
    """A JSON object from a file; `missing` says what the file is for when it is absent."""
    if not os.path.exists(path):
        raise MinisdError(f"{path}: missing ({missing})")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or first_line(e)})") from None
    except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, nested too deep
        raise MinisdError(f"{path}: not valid JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise MinisdError(f"{path}: holds a JSON {type(data).__name__}, expected an object")
    return data


def shard_files(index):
    """The files a sharded checkpoint's .index.json lists in its weight_map, each checked to exist."""
    weight_map = read_json(index, "").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise MinisdError(f"{index}: no 'weight_map' naming a shard file for each key")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        path = os.path.join(os.path.dirname(index), name)
        if not os.path.exists(path):
            raise MinisdError(f"{index}: shard file {name!r} is missing")
        shards.append(path)
    return shards


def atomic_save(tensors, path, metadata=None):
    """Write a .safetensors file through a temporary file and a rename, making its folder if needed; a
    path that cannot be written is one error naming it, and leaves no temporary file behind."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise MinisdError(f"{path}: is a folder, expected a file name")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise MinisdError(f"{path}: cannot write ({e.strerror})") from None
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), errors=(SafetensorError,))


def all_finite(t):
    """No NaN or inf, in one vectorised pass: min and max propagate NaN, and an inf is an extreme."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() & hi.isfinite())
