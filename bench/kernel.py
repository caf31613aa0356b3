"""The fused SeLoRA op vs the PyTorch reference on every adapted-layer shape of SD-1.5: forward + backward
with and without Fisher terms, a bare nn.Linear forward + backward (the floor), and the per-sample Fisher
kernels alone against the device's measured copy bandwidth.

    python bench/kernel.py --json kernel.json                  # GPU: U-Net at 224 and 512 px (batch 8) + text encoder, bf16
    python bench/kernel.py --smoke --emulated --json k.json    # CPU rehearsal: tiny shapes, the op's CPU emulation

Targets (medians over the shapes): fused fwd+bwd+Fisher ≥ 1.5× the reference; Fisher terms add ≤ 15% to the
fused op; the Fisher kernels move their least bytes (P and Q read once, outputs written once) at ≥ 60% of the
copy bandwidth on the memory-bound shapes, those where that least traffic is ≥ 32 MiB (launch latency and
the per-sample reduction's fixed cost small beside it).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from minisd.adapters.fused import FusedSeLoRAOps, selora_ops  # noqa: E402
from minisd.adapters.op import selora_backward, selora_forward  # noqa: E402
from minisd.config import CONFIGS  # noqa: E402
from minisd.model import StableDiffusion  # noqa: E402
from common import environment, target, write_json  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCALE = 0.5
MEMORY_BOUND_BYTES = 32 * 2 ** 20


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
    """`count` sets of a layer's operands (rotated through, so that timings do not measure the cache), with
    u = x [A; K]ᵀ and v = g B for the Fisher kernels alone."""
    d_in, d_out, tokens, bias = shape
    M = batch * tokens
    randn = lambda *s, std=1.0: (std * torch.randn(*s, device=device)).to(dtype)  # noqa: E731
    weight, b = randn(d_out, d_in, std=d_in ** -0.5), randn(d_out, std=0.1) if bias else None
    A, B = randn(rank, d_in, std=d_in ** -0.5), randn(d_out, rank, std=rank ** -0.5)
    sets = []
    for _ in range(count):
        c = SimpleNamespace(x=randn(M, d_in), g=randn(M, d_out), K=randn(d_in, std=d_in ** -0.5), weight=weight,
                            bias=b, A=A, B=B, n=batch)
        c.u, c.v = c.x @ torch.cat([A, c.K[None]]).t(), c.g @ B
        sets.append(c)
    return sets


def selora_step(forward, backward, fisher):
    def step(c):
        y, u = forward(c.x, c.weight, c.bias, c.A, c.B, SCALE, c.K if fisher else None)
        backward(c.g, c.x, c.weight, c.A, c.B, u, SCALE, c.n, "sample" if fisher else None, True)
    return step


def linear_step(c):
    F.linear(c.x, c.weight, c.bias)
    c.g @ c.weight  # grad x; the base weight is frozen


def fisher_kernels_step(extension, rank):
    def step(c):
        extension.fisher_kernels(c.g, c.u, rank, c.n, SCALE)  # grad B, F_B, G_new, F_new
        extension.fisher_kernels(c.x, c.v, rank, c.n, SCALE)  # grad A, F_A
    return step


def fisher_kernel_bytes(shape, batch, rank, itemsize):
    """Least traffic of the two Fisher-kernel calls: g, [u | p], x, v read once; grad B, grad A in the
    inputs' dtype and F_B, F_A, G_new, F_new per output column in fp32 written once."""
    d_in, d_out, tokens, _ = shape
    M = batch * tokens
    reads = M * (d_out + rank + 1 + d_in + rank) * itemsize
    writes = (d_out + d_in) * rank * (itemsize + 4) + 2 * d_out * 4
    return reads + writes


def fisher_kernel_flops(shape, batch, rank):
    """Multiply-adds (×2) of the two Fisher-kernel calls: every element of g times its row of [u | p], of x times v."""
    d_in, d_out, tokens, _ = shape
    return 2 * batch * tokens * (d_out * (rank + 1) + d_in * rank)


def print_floor(shapes, batch, rank, itemsize, copy_bytes_per_s=4.3e12, simt_flops=67e12, mma_flops=790e12):
    """The Fisher kernels' floor per shape, before any measurement: least bytes over the copy bandwidth against
    FLOPs over the CUDA cores' fp32 rate (q ≤ 8) or the tensor cores' rate (fp16/bf16, q > 8); H200 figures."""
    tensor_cores = itemsize == 2 and rank + 1 > 8
    print(f"# Fisher kernels' floor, rank {rank}, batch {batch}, {itemsize}-byte inputs: bytes at "
          f"{copy_bytes_per_s / 1e12:.1f} TB/s vs FLOPs at {(mma_flops if tensor_cores else simt_flops) / 1e12:.0f} "
          f"TFLOP/s ({'tensor' if tensor_cores else 'CUDA'} cores)")
    print("| in→out | tokens | MiB | GFLOP | FLOP/byte | bytes µs | FLOPs µs | bound |\n|" + "---|" * 8)
    for shape in shapes:
        nbytes, flops = fisher_kernel_bytes(shape, batch, rank, itemsize), fisher_kernel_flops(shape, batch, rank)
        t_bytes, t_flops = nbytes / copy_bytes_per_s * 1e6, flops / (mma_flops if tensor_cores else simt_flops) * 1e6
        print(f"| {shape[0]}→{shape[1]} | {shape[2]} | {nbytes / 2 ** 20:.1f} | {flops / 1e9:.2f} | "
              f"{flops / nbytes:.1f} | {t_bytes:.1f} | {t_flops:.1f} | {'memory' if t_bytes >= t_flops else 'compute'} |")


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
    src, dst = torch.randn(numel, device=device).to(dtype), torch.empty(numel, dtype=dtype, device=device)
    ms = median_ms(lambda _: dst.copy_(src), [None], device, warmup, repeats)
    return 2 * numel * dtype.itemsize / (ms * 1e-3)


def targets(rows):
    """The three targets of the fused op, as medians over the shapes measured so far."""
    fused = [r for r in rows if "fused_fisher_ms" in r]
    bound = [r["fisher_kernels_of_copy"] for r in fused if r["memory_bound"]]
    median = lambda values: statistics.median(values) if values else None  # noqa: E731
    speedup = median([r["speedup_fisher"] for r in fused])
    overhead = median([100 * r["fisher_overhead"] for r in fused])
    bandwidth = median([100 * f for f in bound])
    return [
        target("fused fwd+bwd+Fisher vs PyTorch reference (median over shapes)", speedup, "×", "≥ 1.5",
               speedup is not None and speedup >= 1.5),
        target("Fisher terms' cost on the fused op (median over shapes)", overhead, "%", "≤ +15",
               overhead is not None and overhead <= 15),
        target("Fisher kernels' bandwidth, of the device copy (median over memory-bound shapes)", bandwidth, "%",
               "≥ 60", bandwidth is not None and bandwidth >= 60),
    ]


def emulated_ops():
    """The op's CUDA sources compiled for the CPU (tests/emulated_op.py): the rehearsal of a GPU run."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import emulated_op
    return FusedSeLoRAOps(emulated_op.cached_build())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --emulated")
    p.add_argument("--smoke", action="store_true", help="tiny model, 64 px, batch 2, a few shapes, few repeats")
    p.add_argument("--emulated", action="store_true", help="the op's CPU emulation instead of the built op")
    p.add_argument("--dtype", default="bf16", choices=DTYPES)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="U-Net image sizes (px)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--json", help="write the results here (rewritten after each shape)")
    p.add_argument("--floor", action="store_true", help="print the Fisher kernels' bytes/FLOPs floor per shape and exit")
    args = p.parse_args()
    args.device = args.device or ("cpu" if args.emulated else "cuda")
    if args.smoke:
        args.batch, args.sizes, args.repeats = 2, [64], 3
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    warmup, sets = (1, 1) if args.smoke else (5, 3)

    if args.floor:
        shapes = {(d_in, d_out, tokens, False) for d_in, d_out, tokens, _ in layer_shapes(
            "tiny" if args.smoke else "sd15", args.sizes, args.batch)}
        return print_floor(sorted(shapes, key=lambda s: (s[2], s[0], s[1])), args.batch, args.rank, dtype.itemsize)

    ops = emulated_ops() if args.emulated else selora_ops(torch.empty(0, device=device))
    if device.type == "cuda" and ops is None:
        sys.exit("error: the fused op is unavailable on this GPU (see the warning above)")
    shapes = layer_shapes("tiny" if args.smoke else "sd15", args.sizes, args.batch)
    if args.smoke:  # the first shape of each token count
        first = {}
        for shape, layers in shapes.items():
            first.setdefault(shape[2], (shape, layers))
        shapes = dict(first.values())
    bandwidth = copy_bandwidth(device, dtype, warmup, args.repeats)
    env = environment(device)
    op = "emulated on the CPU" if args.emulated else "fused CUDA" if ops is not None else "none"
    print(f"# SeLoRA layer fwd+bwd, {args.dtype}, rank {args.rank}, batch {args.batch}, U-Net at "
          f"{'/'.join(map(str, args.sizes))} px + text encoder, op: {op} — {env}; copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s")
    print("| in→out | tokens | bias | layers per step | linear ms | ref ms | ref+F ms | fused ms | fused+F ms "
          "| ref+F / fused+F | Fisher cost | Fisher kernels ms | of copy BW |\n|" + "---|" * 13)
    rows = []
    payload = {"environment": env, "args": vars(args), "op": op, "copy_bytes_per_s": bandwidth, "rows": rows}
    for shape, layers in shapes.items():
        inputs = input_sets(shape, args.batch, args.rank, dtype, device, sets)
        time_of = lambda step: median_ms(step, inputs, device, warmup, args.repeats)  # noqa: E731
        row = {"in": shape[0], "out": shape[1], "tokens": shape[2], "bias": shape[3], "layers": layers,
               "linear_ms": time_of(linear_step),
               "reference_ms": time_of(selora_step(selora_forward, selora_backward, False)),
               "reference_fisher_ms": time_of(selora_step(selora_forward, selora_backward, True))}
        if ops is not None:
            row["fused_ms"] = time_of(selora_step(ops.forward, ops.backward, False))
            row["fused_fisher_ms"] = time_of(selora_step(ops.forward, ops.backward, True))
            row["speedup_fisher"] = row["reference_fisher_ms"] / row["fused_fisher_ms"]
            row["fisher_overhead"] = row["fused_fisher_ms"] / row["fused_ms"] - 1
            row["fisher_kernels_ms"] = time_of(fisher_kernels_step(ops.extension, args.rank))
            row["fisher_kernel_bytes"] = fisher_kernel_bytes(shape, args.batch, args.rank, dtype.itemsize)
            row["fisher_kernels_of_copy"] = row["fisher_kernel_bytes"] / (row["fisher_kernels_ms"] * 1e-3) / bandwidth
            row["memory_bound"] = row["fisher_kernel_bytes"] >= MEMORY_BOUND_BYTES
        rows.append(row)
        payload["targets"] = targets(rows)
        write_json(args.json, payload)
        fmt = lambda key, spec=".3f": format(row[key], spec) if key in row else "–"  # noqa: E731
        fused = ops is not None
        bw = f"{row['fisher_kernels_of_copy']:.0%}{'' if row['memory_bound'] else ' (small)'}" if fused else "–"
        cost = f"{row['fisher_overhead']:+.0%}" if fused else "–"
        where = " ".join(f"{part}×{n}" for part, n in layers.items())
        print(f"| {shape[0]}→{shape[1]} | {shape[2]} | {'yes' if shape[3] else 'no'} | {where} | {fmt('linear_ms')} "
              f"| {fmt('reference_ms')} | {fmt('reference_fisher_ms')} | {fmt('fused_ms')} | {fmt('fused_fisher_ms')} "
              f"| {fmt('speedup_fisher', '.2f')} | {cost} | {fmt('fisher_kernels_ms')} | {bw} |", flush=True)
        inputs = None  # freed before the next shape allocates its own
    parts = [f"unet@{size}" for size in args.sizes] + ["text"]
    payload["totals_ms"] = {part: {key: sum(r[key] * r["layers"].get(part, 0) for r in rows)
                                   for key in rows[0] if key.endswith("_ms")} for part in parts}
    write_json(args.json, payload)
    for part, total in payload["totals_ms"].items():
        print(f"{part}, all adapted layers of one step (ms): " + ", ".join(f"{k[:-3]} {v:.2f}" for k, v in total.items()))
    for t in payload["targets"]:
        figure = "–" if t["figure"] is None else f"{t['figure']:.3g}"
        print(f"target: {t['name']}: {figure} {t['unit']} (target {t['target']}): "
              f"{'met' if t['met'] else 'not measured' if t['met'] is None else 'NOT met'}")


if __name__ == "__main__":
    main()
