"""The fused SeLoRA op vs the PyTorch reference on every adapted-layer shape of SD-1.5: forward + backward
with and without Fisher terms, against a bare nn.Linear forward + backward (the floor) and the device's
measured copy bandwidth.

    python bench/kernel.py --json kernel.json      # GPU: U-Net at 224 and 512 px (batch 8) + text encoder, bf16
    python bench/kernel.py --device cpu --quick    # smoke run: the tiny model's shapes, reference only
"""
import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minisd.adapters.op import selora_backward, selora_forward  # noqa: E402
from minisd.config import CONFIGS  # noqa: E402
from minisd.fused import selora_ops  # noqa: E402
from minisd.model import StableDiffusion  # noqa: E402
from common import environment, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE = 0.5


def layer_shapes(config, sizes, batch):
    """{(in, out, tokens per sample, bias): {part: layer calls}} for every nn.Linear of the U-Net (at each
    image size) and the text encoder, read off forward passes on meta tensors."""
    with torch.device("meta"):
        sd = StableDiffusion(CONFIGS[config])
    calls, part = {}, None

    def record(module, inputs, output):
        x = inputs[0]
        key = (module.in_features, module.out_features, x.numel() // (x.shape[0] * module.in_features),
               module.bias is not None)
        calls.setdefault(key, {}).setdefault(part, 0)
        calls[key][part] += 1

    for module in sd.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(record)
    c = sd.config
    with torch.device("meta"):
        for size in sizes:
            part = f"unet@{size}"
            sd.unet(torch.empty(batch, c.unet.in_channels, size // 8, size // 8), torch.zeros(batch, dtype=torch.long),
                    torch.empty(batch, c.text.max_positions, c.unet.context_dim))
        part = "text"
        sd.text_encoder(torch.zeros(batch, c.text.max_positions, dtype=torch.long))
    return dict(sorted(calls.items()))


def input_sets(shape, batch, rank, dtype, device, count):
    d_in, d_out, tokens, bias = shape
    M = batch * tokens
    randn = lambda *s, std=1.0: (std * torch.randn(*s, device=device)).to(dtype)
    weight, b = randn(d_out, d_in, std=d_in ** -0.5), randn(d_out, std=0.1) if bias else None
    A, B = randn(rank, d_in, std=d_in ** -0.5), randn(d_out, rank, std=rank ** -0.5)
    return [SimpleNamespace(x=randn(M, d_in), g=randn(M, d_out), K=randn(d_in, std=d_in ** -0.5), weight=weight,
                            bias=b, A=A, B=B, n=batch) for _ in range(count)]


def selora_step(forward, backward, fisher):
    def step(c):
        y, u = forward(c.x, c.weight, c.bias, c.A, c.B, SCALE, c.K if fisher else None)
        backward(c.g, c.x, c.weight, c.A, c.B, u, SCALE, c.n, "sample" if fisher else None, True)
    return step


def linear_step(c):
    F.linear(c.x, c.weight, c.bias)
    c.g @ c.weight  # grad x; the base weight is frozen


def median_ms(step, inputs, device, warmup, repeats):
    """Median time of one step, rotating through the input sets (CUDA events on the GPU)."""
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    if device.type != "cuda":
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            step(inputs[i % len(inputs)])
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for i, (start, end) in enumerate(events):
        start.record()
        step(inputs[i % len(inputs)])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def copy_bandwidth(device, dtype, warmup, repeats):
    """Bytes read + written per second by a plain device copy of 1 GiB (64 MiB on the CPU)."""
    numel = (2 ** 30 if device.type == "cuda" else 2 ** 26) // dtype.itemsize
    src, dst = torch.empty(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device)
    ms = median_ms(lambda _: dst.copy_(src), [None], device, warmup, repeats)
    return 2 * numel * dtype.itemsize / (ms * 1e-3)


def selora_bytes(shape, batch, rank, itemsize):
    """Least traffic of SeLoRA forward + backward: x, W, A, B read and y, u written; then grad y, x, W,
    A, B, u read and grad x, grad A, grad B written."""
    d_in, d_out, tokens, _ = shape
    M = batch * tokens
    return itemsize * (3 * M * d_in + 2 * M * d_out + 2 * d_out * d_in + 2 * M * rank + 3 * rank * (d_in + d_out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny model, 64 px, batch 2, few repeats")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="U-Net image sizes (px)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.batch, args.sizes, args.repeats = 2, [64], 5
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    warmup, sets = (1, 2) if args.quick else (5, 3)

    ops = selora_ops(torch.empty(0, device=device))
    if device.type == "cuda" and ops is None:
        sys.exit("error: the fused op is unavailable on this GPU (see the warning above)")
    shapes = layer_shapes("tiny" if args.quick else "sd15", args.sizes, args.batch)
    bandwidth = copy_bandwidth(device, dtype, warmup, args.repeats)
    env = environment(device)
    print(f"# SeLoRA layer fwd+bwd, {args.dtype}, rank {args.rank}, batch {args.batch}, U-Net at "
          f"{'/'.join(map(str, args.sizes))} px + text encoder — {env}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print("| in→out | tokens | bias | layers per step | linear ms | ref ms | ref+F ms | fused ms | fused+F ms "
          "| ref+F / fused+F | fused+F GB/s | of copy BW |\n|" + "---|" * 12)
    rows = []
    for shape, layers in shapes.items():
        inputs = input_sets(shape, args.batch, args.rank, dtype, device, sets)
        time_of = lambda step: median_ms(step, inputs, device, warmup, args.repeats)
        row = {"in": shape[0], "out": shape[1], "tokens": shape[2], "bias": shape[3], "layers": layers,
               "linear_ms": time_of(linear_step),
               "reference_ms": time_of(selora_step(selora_forward, selora_backward, False)),
               "reference_fisher_ms": time_of(selora_step(selora_forward, selora_backward, True))}
        if ops is not None:
            row["fused_ms"] = time_of(selora_step(ops.forward, ops.backward, False))
            row["fused_fisher_ms"] = time_of(selora_step(ops.forward, ops.backward, True))
            row["speedup_fisher"] = row["reference_fisher_ms"] / row["fused_fisher_ms"]
            row["fused_fisher_bytes_per_s"] = selora_bytes(shape, args.batch, args.rank, dtype.itemsize) / (
                row["fused_fisher_ms"] * 1e-3)
        rows.append(row)
        fmt = lambda key, spec=".3f": format(row[key], spec) if key in row else "–"
        bw = f"{row['fused_fisher_bytes_per_s'] / bandwidth:.0%}" if ops is not None else "–"
        where = " ".join(f"{part}×{n}" for part, n in layers.items())
        print(f"| {shape[0]}→{shape[1]} | {shape[2]} | {'yes' if shape[3] else 'no'} | {where} | {fmt('linear_ms')} "
              f"| {fmt('reference_ms')} | {fmt('reference_fisher_ms')} | {fmt('fused_ms')} | {fmt('fused_fisher_ms')} "
              f"| {fmt('speedup_fisher', '.2f')} | {fmt('fused_fisher_bytes_per_s', '.3g')} | {bw} |")
        del inputs
    parts = [f"unet@{size}" for size in args.sizes] + ["text"]
    totals = {part: {key: sum(r[key] * r["layers"].get(part, 0) for r in rows) for key in rows[0] if key.endswith("_ms")}
              for part in parts}
    for part, total in totals.items():
        print(f"{part}, all adapted layers of one step (ms): " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in total.items()))
    write_json(args.json, {"env": env, "args": vars(args), "copy_bytes_per_s": bandwidth, "rows": rows,
                           "totals_ms": totals})


if __name__ == "__main__":
    main()
