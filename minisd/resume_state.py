"""What a training checkpoint (runs/NAME/checkpoint.pt) holds, checked field by field before any of it is used:
a damaged or foreign file is one error naming the field, never a traceback midway through setting up the run,
and a run never continues from NaN or infinite state."""
import math
import os

import torch

from .checkpoint.files import all_finite, first_line
from .errors import MinisdError

KEYS = ("step", "trainable", "optimizer", "scaler", "generator", "torch_rng", "best_val", "rank_history", "controller")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_bytes(value):
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8


def measures_fit(measures):
    """A Measures.state_dict() (absent from older checkpoints)."""
    if measures is None:
        return True
    return isinstance(measures, dict) and is_number(measures.get("wall_time_s", 0.0)) and \
        (measures.get("peak_memory_bytes") is None or is_int(measures["peak_memory_bytes"])) and \
        (measures.get("best") is None or isinstance(measures["best"], dict))


# field: (test, what it should be)
FIELDS = {
    "step": (lambda v: is_int(v) and v >= 0, "a step number"),
    "trainable": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) and
                                                        t.is_floating_point() for k, t in v.items()),
                  "parameter names with floating-point tensors"),
    "optimizer": (lambda v: isinstance(v, dict), "an optimizer state"),
    "scaler": (lambda v: isinstance(v, dict), "a gradient scaler state"),
    "generator": (is_bytes, "a random generator state"),
    "torch_rng": (is_bytes, "a random generator state"),
    "best_val": (lambda v: is_number(v) and not math.isnan(v), "a validation loss"),
    "rank_history": (lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v), "a list of rank events"),
    "controller": (lambda v: v is None or isinstance(v, dict), "an adapter controller state"),
    "measures": (measures_fit, "a record of wall time and memory"),
    "args": (lambda v: v is None or isinstance(v, dict), "the run's arguments"),
}


def read_training_checkpoint(path):
    """The state saved at `path` by Trainer.save_checkpoint, every field of the type written there."""
    if not os.path.exists(path):
        raise MinisdError(f"--resume: {path} not found (the run has not saved a checkpoint yet)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MinisdError(f"--resume: {path} cannot be read, it is damaged or not from train.py ({first_line(e)})") from None
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else ["step"]
    if missing:
        raise MinisdError(f"--resume: {path} is not a training checkpoint (no {missing[0]!r})")
    for key, (fits, what) in FIELDS.items():
        if key in state and not fits(state[key]):
            raise MinisdError(f"--resume: {path}: {key!r} is damaged, expected {what} (the file is damaged or "
                              f"not from train.py)")
    where = non_finite(state)
    if where:
        raise MinisdError(f"--resume: {path}: {where} holds NaN or infinite values (resume from a copy saved before "
                          f"the damage, or start the run again)")
    return state


def non_finite(value, where=""):
    """The place (e.g. "trainable/unet.x.lora_A") of the first floating-point tensor in `value` holding a NaN or
    an infinity, or None."""
    if isinstance(value, torch.Tensor):
        return where if value.is_floating_point() and not all_finite(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = non_finite(item, f"{where}/{key}" if where else str(key))
        if found:
            return found
    return None
