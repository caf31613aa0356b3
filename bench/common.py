"""Timing helpers shared by the benchmarks."""
import datetime
import json
import os
import platform
import statistics
import sys
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


def save_results(path, env, targets, **results):
    """Rewrite the JSON at `path` with everything measured so far."""
    write_json(path, {"environment": env, "targets": targets, **results})


def peak_memory(device, baseline):
    """Bytes allocated at the peak since the last reset, above `baseline` (what was allocated before)."""
    return torch.cuda.max_memory_allocated() - baseline if str(device).startswith("cuda") else None


def reset_peak_memory(device):
    """Start a peak-memory measurement; returns the baseline for peak_memory."""
    if not str(device).startswith("cuda"):
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def random_model(config, device):
    """minisd.build(config, seed=0) with its weights drawn on `device` (SD-1.5 size in seconds on a GPU)."""
    import minisd
    with torch.device(device):
        return minisd.build(config, seed=0, device=device)


def diffusers_models(sd, dtype, device):
    """diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel holding sd's weights,
    converted by minisd's own diffusers-name mapping (what save_diffusers writes)."""
    import diffusers
    import transformers
    from minisd.checkpoint.writing import diffusers_configs, diffusers_state_dict
    configs = diffusers_configs(sd.config)
    with torch.device(device):   # their random initialisation on the device: seconds, not a minute of CPU
        models = {"unet": diffusers.UNet2DConditionModel.from_config(configs["unet"]),
                  "vae": diffusers.AutoencoderKL.from_config(configs["vae"]),
                  "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"]))}
    for part in sd.parts():
        tensors, expected = diffusers_state_dict(sd, part), models[part].state_dict()
        if not expected.keys() & tensors.keys():   # transformers 5 names CLIPTextModel's keys without `text_model.`
            tensors = {name.removeprefix("text_model."): value for name, value in tensors.items()}
        missing, unexpected = models[part].load_state_dict(tensors, strict=False)
        if unexpected or [k for k in missing if not k.endswith("position_ids")]:
            raise RuntimeError(f"{part}: weights do not map onto diffusers' model ({(unexpected or missing)[0]})")
    return {part: m.to(device=device, dtype=dtype).eval().requires_grad_(False) for part, m in models.items()}


def rehearse_on_cpu():
    """--smoke: one thread (tiny tensors), and CUDA-graph capture emulated on the CPU (tests/emulated_graphs.py),
    so that the GPU run's capture and replay paths run in the rehearsal too."""
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from emulated_graphs import EmulatedGraphs
    from minisd import graphs
    graphs.BACKEND = EmulatedGraphs()
