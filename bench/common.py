"""Timing helpers shared by the benchmarks."""
import datetime
import json
import os
import platform
import statistics
import tempfile
import time

import torch


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device, warmup=2, repeats=5):
    """Median wall time of fn() in seconds, after warm-up, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def environment(device):
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor() or "cpu"}
    if str(device).startswith("cuda"):
        info["cuda"] = torch.version.cuda
    return info


def write_json(path, payload):
    """Write payload to path (parents created) atomically, so that a run cut short leaves the last whole file."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
        json.dump(payload, f, indent=2)
    os.replace(f.name, path)


def target(name, figure, unit, goal, met):
    """One entry of a bench JSON's "targets": the figure measured against the goal the project set for it
    (figure and met None when it could not be measured)."""
    return {"name": name, "figure": figure, "unit": unit, "target": goal, "met": None if figure is None else bool(met)}
