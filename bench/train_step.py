"""Training-step throughput and peak memory: SeLoRA at a test step (Fisher terms on) and between tests, vs
plain LoRA with the same per-layer ranks, on an SD-1.5-size model with random weights.

The step is minisd.training's Trainer.loss + Trainer.train_step, written out here because a Trainer
builds a data set and a run folder from its arguments and loads its model from a file or hub id, so
it cannot hold random SD-1.5 weights: VAE encode without grad and a latent sample, noise at random
timesteps, text encoder on the tokenised prompts and U-Net under autocast, MSE against the noise,
backward, Adam step, and for SeLoRA the controller's begin_step / end_step around it. Images are random
tensors already on the device, so no data loading is timed. Every SeLoRA layer is grown to --rank first;
LoRA is injected at --rank into a fresh model. At a test step the controller tracks Fisher terms and
computes every FI-ratio (λ = ∞, so no layer grows and the ranks stay equal); between tests it does neither.
Peak memory is torch.cuda.max_memory_allocated over a row's steps: weights, activations and Adam state.

    python bench/train_step.py --grad-checkpointing --json train_step.json   # GPU: sd15, 224 + 512 px, batch 8, bf16
    python bench/train_step.py --config tiny --device cpu --resolutions 64 --batch-size 2 --steps 2   # smoke run
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minisd  # noqa: E402
from minisd import adapters  # noqa: E402
from minisd.cli import main_guard, pick_device  # noqa: E402
from minisd.errors import MinisdError  # noqa: E402
from minisd.fused import selora_ops  # noqa: E402
from minisd.sampling import add_noise, alphas_cumprod  # noqa: E402
from minisd.training import AUTOCAST  # noqa: E402
from common import environment, median_time, write_json  # noqa: E402

PROMPTS = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis. No pneumothorax.",
    "Stable 8 mm nodule in the right upper lobe. No focal consolidation, effusion or pneumothorax.",
    "Heart size and pulmonary vascularity appear within normal limits. No pleural effusion is seen.",
]
MODES = {"selora-test": "SeLoRA, test step", "selora-between": "SeLoRA, between tests", "lora": "LoRA"}


def adapted_model(config, method, rank, device):
    """A fresh random model with `method` adapters at `rank` in every layer (SeLoRA grown to it from 1)."""
    sd = minisd.build(config, seed=0, device=device)
    torch.manual_seed(0)
    adapters.inject(sd, method, rank=rank)
    layers = adapters.adapted_layers(sd)
    if method == "selora":
        for layer in layers.values():
            for _ in range(min(rank, layer.max_rank) - 1):
                layer.expand()
                layer.reset_fisher()
    return sd, layers


def make_step(sd, optimizer, controller, images, autocast_dtype, device):
    """One training step as Trainer.train_step does it, on a fixed image batch with fresh random draws."""
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    autocast = lambda: torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)  # noqa: E731
    ac = alphas_cumprod().to(device)
    generator = torch.Generator().manual_seed(0)
    n, shape = len(images), (4, images.shape[-2] // 8, images.shape[-1] // 8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    step_count = [0]

    def step():
        step_count[0] += 1
        if controller is not None:
            controller.begin_step(step_count[0])
        latent, noise = torch.randn(n, *shape, generator=generator), torch.randn(n, *shape, generator=generator)
        t = torch.randint(0, 1000, (n,), generator=generator)
        latent, noise, t = latent.to(device), noise.to(device), t.to(device)
        with torch.no_grad(), autocast():
            mean, logvar = sd.vae.encode(images)
        latents = (mean.float() + (0.5 * logvar.float()).exp() * latent) * sd.vae.scaling_factor
        noisy = add_noise(latents, noise, t, ac)
        with autocast():
            context = sd.text_encoder(sd.tokenizer(prompts).to(device))
            eps = sd.unet(noisy, t, context)
        loss = F.mse_loss(eps.float(), noise)
        loss.backward()
        loss.item()  # the Trainer reads every step's loss
        optimizer.step()
        if controller is not None:
            controller.end_step(step_count[0], optimizer)
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(step, device, warmup, steps, batch):
    """(images/s, peak allocated bytes or None), or None when the step runs out of GPU memory."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds = median_time(step, device, warmup=warmup, repeats=steps)
    except torch.cuda.OutOfMemoryError:
        return None
    return batch / seconds, torch.cuda.max_memory_allocated() if cuda else None


@main_guard
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", choices=minisd.CONFIGS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224, 512])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=4, help="every layer's rank, for both adapters")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast; adapters stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="also measure with gradient checkpointing")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if min(args.batch_size, args.rank, args.steps) < 1 or args.warmup < 0:
        raise MinisdError("--batch-size, --rank and --steps must be at least 1, --warmup at least 0")
    bad = [r for r in args.resolutions if r < 8 or r % 8]
    if bad:
        raise MinisdError(f"--resolutions {bad[0]}: must be a positive multiple of 8 (the VAE downsamples by 8)")
    device = pick_device(args.device)
    cuda = device.startswith("cuda")
    op = "fused CUDA" if cuda and selora_ops(torch.empty(0, device=device)) is not None else "PyTorch reference"
    g = torch.Generator().manual_seed(0)
    images = {r: (torch.rand(args.batch_size, 3, r, r, generator=g) * 2 - 1).to(device) for r in args.resolutions}
    checkpointing = [False, True] if args.grad_checkpointing else [False]

    results, trainable, ranks = {}, {}, {}
    for method in ("selora", "lora"):
        sd, layers = adapted_model(args.config, method, args.rank, device)
        ranks[method] = {name: layer.rank for name, layer in layers.items()}
        params = [p for p in sd.parameters() if p.requires_grad]
        trainable[method] = sum(p.numel() for p in params)
        optimizer = torch.optim.Adam(params, lr=args.lr)
        # SeLoRA: a test at every step with λ = ∞ (Fisher terms and FI-ratios, no growth), or a test never
        controllers = {"lora": None} if method == "lora" else {
            "selora-test": adapters.SeLoRAController(layers.items(), lam=math.inf, every=1),
            "selora-between": adapters.SeLoRAController(layers.items(), every=2 ** 62)}
        for ckpt in checkpointing:
            sd.unet.gradient_checkpointing = sd.text_encoder.text_model.encoder.gradient_checkpointing = ckpt
            for resolution in args.resolutions:
                for mode, controller in controllers.items():
                    step = make_step(sd, optimizer, controller, images[resolution], AUTOCAST[args.precision], device)
                    results[mode, ckpt, resolution] = measure(step, device, args.warmup, args.steps, args.batch_size)
                    optimizer.zero_grad(set_to_none=True)
        del sd, layers, params, optimizer, controllers, step
    if ranks["selora"] != ranks["lora"]:
        raise MinisdError(f"SeLoRA and LoRA ranks differ (a layer narrower than --rank {args.rank}?)")

    rows = []
    for ckpt in checkpointing:
        for resolution in args.resolutions:
            lora = results["lora", ckpt, resolution]
            for mode in MODES:
                r = results[mode, ckpt, resolution]
                row = {"resolution": resolution, "grad_checkpointing": ckpt, "adapter": mode,
                       "images_per_s": r and r[0], "peak_bytes": r and r[1]}
                if r and lora:
                    row["time_vs_lora"] = lora[0] / r[0]
                    if cuda:
                        row["peak_vs_lora"] = r[1] / lora[1]
                rows.append(row)

    env = environment(device)
    numerics = "bf16 autocast" if args.precision == "bf16" else "fp32"
    print(f"# {args.config} training step, batch {args.batch_size}, {numerics}, rank {args.rank} in all "
          f"{len(ranks['lora'])} adapted layers ({trainable['lora']:,} trainable parameters), SeLoRA op: {op} — {env}")
    print("| px | grad ckpt | adapter | step ms | images/s | peak GiB | time / LoRA | peak / LoRA |\n|" + "---|" * 8)
    fmt = lambda value, spec: "–" if value is None else format(value, spec)  # noqa: E731
    for row in rows:
        ips = row["images_per_s"]
        print(f"| {row['resolution']} | {'on' if row['grad_checkpointing'] else 'off'} | {MODES[row['adapter']]} "
              f"| {fmt(ips and 1e3 * args.batch_size / ips, '.1f')} | {fmt(ips, '.2f') if ips else 'out of memory'} "
              f"| {fmt(row['peak_bytes'] and row['peak_bytes'] / 2 ** 30, '.2f')} "
              f"| {fmt(row.get('time_vs_lora'), '.3f')} | {fmt(row.get('peak_vs_lora'), '.3f')} |")
    write_json(args.json, {"env": env, "args": vars(args), "selora_op": op, "trainable_params": trainable["lora"],
                           "adapted_layers": len(ranks["lora"]), "rows": rows})


if __name__ == "__main__":
    main()
