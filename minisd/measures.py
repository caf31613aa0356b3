"""What a paper's tables report about a training run, kept across resumes and written to the run folder's
summary.json: trainable parameters per part (absolute and % of the part), wall time, peak memory, and
the best and the last adapter (step, validation loss, parameters, ranks per layer, heat-maps)."""
import sys
import time

import torch

from .adapters.inject import PARTS

try:
    import resource
except ImportError:   # Windows: no peak resident set size
    resource = None


def parameter_counts(sd, parts=PARTS):
    """{part: {"trainable", "total", "percent"}} for the U-Net and the text encoder (or `parts`) and the whole
    model; a part's total counts all of its parameters, adapters included (peft's "trainable%")."""
    counts = {}
    for part in (*parts, None):
        params = list(getattr(sd, part).parameters() if part else sd.parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        counts[part or "all"] = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}
    return counts


def peak_memory(device):
    """(bytes or None, what was measured): CUDA's max allocated memory on a GPU, else the process's peak
    resident set size."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    if resource is None:
        return None, "max_rss"
    kib_or_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # bytes on macOS, KiB on Linux
    return kib_or_bytes * (1 if sys.platform == "darwin" else 1024), "max_rss"


class Measures:
    """Wall time and peak memory summed or maxed over the sessions of a run, and its best adapter's record.
    `state_dict()` goes into the checkpoint, so a resumed run continues the same figures."""

    def __init__(self, device, state=None):
        state = state or {}
        self.device = device
        self.wall_before = state.get("wall_time_s", 0.0)
        self.peak_before = state.get("peak_memory_bytes")
        self.best = state.get("best")
        self.started = time.perf_counter()

    def wall_time(self):
        return self.wall_before + time.perf_counter() - self.started

    def peak_memory(self):
        now, _ = peak_memory(self.device)
        return max((v for v in (self.peak_before, now) if v is not None), default=None)

    def state_dict(self):
        return {"wall_time_s": self.wall_time(), "peak_memory_bytes": self.peak_memory(), "best": self.best}

    @staticmethod
    def adapter_record(sd, ranks, step, val_loss, adapter, heatmaps):
        """What the tables need of one adapter file."""
        return {"adapter": adapter, "step": step, "val_loss": val_loss, "parameters": parameter_counts(sd),
                "ranks": ranks, "heatmaps": heatmaps}

    def summary(self, step, total_steps, last, finished):
        return {"step": step, "total_steps": total_steps, "finished": finished, "wall_time_s": self.wall_time(),
                "peak_memory": {"bytes": self.peak_memory(), "measure": peak_memory(self.device)[1],
                                "device": str(self.device)},
                "best": self.best, "last": last}
