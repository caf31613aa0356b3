"""Timing helpers shared by the benchmarks."""
import datetime
import json
import platform
import statistics
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
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
