"""Training step: images/s and peak memory of minisd's step against diffusers' train_text_to_image_lora.py
recipe, on an SD-1.5-size model with random weights, bf16, batch 8, at 224 and 512 px; SeLoRA at a test step
against plain LoRA of the same per-layer ranks; and the paper's IU X-Ray fine-tune projected from the parts.

minisd: train.py's own Trainer step after its pre-pass — latents (and nothing else: the text encoder is
adapted) from the cache, frozen weights in bf16, channels_last, the step captured as a CUDA graph and
replayed, each step's loss read while the next one runs (as the training loop does). Rows: SeLoRA between
tests; SeLoRA at a test step (Fisher terms tracked, every FI-ratio read back, λ = ∞ so that nothing grows and
the test step is itself captured); LoRA with every layer at --rank (SeLoRA's layers are grown to --rank
first); and, at the first resolution, to show what each part buys, SeLoRA between tests eager (no CUDA graph)
and without channels_last.
diffusers + peft: diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel holding the
same weights (converted by minisd's diffusers-name mapping), peft LoRA r = --rank (alpha = r, dropout 0) on the
same modules minisd adapts (every nn.Linear of the U-Net and the text encoder), trained as the script trains:
frozen weights in bf16, LoRA parameters in fp32, bf16 autocast, the VAE encoding the batch and sampling its
latents at every step, AdamW, gradient clipping at 1.0, the loss read every step. Its images and token ids
are already on the device; minisd's images come from the phantom set through the pre-pass (not timed).
Peak memory is torch.cuda.max_memory_allocated above what was allocated before each contender was built.

The projection: the paper's fine-tune — 2,640 training images, 3,300 steps of 8 at 224 px, a SeLoRA test every
40 steps, 10 validations (the loss on 528 validation images and a grid of 4 images × 25 DDIM steps) — from
measured parts: the pre-pass (decoding a synthetic 512² film with 4 loader processes, and VAE encoding), the
captured step, a test period (the test step eager with every layer growing, the next step's warm-up and
capture), the validation loss per image and the grid's sampling. Loading the model is not counted.

    python bench/train_step.py --json results/train_step.json    # H100/H200, about 2 minutes
    python bench/train_step.py --smoke                           # CPU rehearsal with the tiny model
"""
import argparse
import copy
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minisd  # noqa: E402
import train  # noqa: E402
from minisd import graphs, training  # noqa: E402
from minisd.image_files import load_image  # noqa: E402
from minisd.cli import main_guard  # noqa: E402
from minisd.sampling import ddim_sample  # noqa: E402
from common import (diffusers_models, environment, peak_memory, random_model, rehearse_on_cpu,  # noqa: E402
                    reset_peak_memory, save_results, sync, target)

PROMPTS = [
    "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear.",
    "Mild cardiomegaly. Small left pleural effusion with adjacent atelectasis. No pneumothorax.",
    "Stable 8 mm nodule in the right upper lobe. No focal consolidation, effusion or pneumothorax.",
    "Heart size and pulmonary vascularity appear within normal limits. No pleural effusion is seen.",
]
IU = dict(images=2640, steps=3300, every=40, val_images=528, validations=10, grid=4, grid_steps=25, workers=4)


class Contender:
    """One model on the device and its step; `run(n)` launches n steps and reads their losses as training does."""

    def __init__(self, step):
        self.step = step

    def run(self, n):
        previous = None
        for _ in range(n):
            loss = self.step()
            if previous is not None:
                previous.item()
            previous = loss
        return previous.item()


def seconds_per_step(contender, steps, warmup, device):
    contender.run(warmup)
    sync(device)
    start = time.perf_counter()
    contender.run(steps)
    sync(device)
    return (time.perf_counter() - start) / steps


def minisd_trainer(base, method, resolution, a, folder, max_steps):
    """train.py's Trainer on the phantom set, its model a copy of `base` (random weights: no file to load)."""
    args, _ = train.parse_args(["--model", "random", "--data", "phantom", "--method", method, "--rank", str(a.rank),
                                "--resolution", str(resolution), "--batch-size", str(a.batch_size),
                                "--max-steps", str(max_steps), "--expand-every", "1", "--precision", a.precision,
                                "--device", a.device, "--workers", str(a.workers), "--val-max", str(a.val_max),
                                "--val-images", "0", "--cfg-dropout", "0", "--run-name", "bench"])
    train.check(args)
    args.data_root = "data/phantom"
    load = training.load
    training.load = lambda *_, **__: copy.deepcopy(base)
    try:
        trainer = training.Trainer(args, os.path.join(folder, f"{method}-{resolution}"), resume=False)
    finally:
        training.load = load
    if method == "selora":   # the same per-layer ranks as LoRA's
        for layer in trainer.layers.values():
            for _ in range(min(a.rank, layer.max_rank) - 1):
                layer.expand()
        minisd.adapters.selora.reset_fishers(trainer.layers.values(), trainer.controller.generator)
    trainer.cache_inputs()
    batches = trainer.batches()
    return trainer, Contender(lambda: trainer.train_step(batches)[0])


def relayout(trainer, layout):
    """The U-Net and the VAE in memory format `layout`. Their convolution weights move to new storage, which the
    captured step (its key holds the adapted parameters, not the frozen weights) would not see: it is captured
    again, after an eager warm-up in the new layout."""
    for part in (trainer.sd.unet, trainer.sd.vae):
        part.to(memory_format=layout)
    if trainer.replayer is not None:
        trainer.replayer.release()
        trainer.replayer = graphs.Replayer(trainer.compute, trainer.device, name=trainer.replayer.name)


def diffusers_reference(base, a):
    """diffusers + peft set up as train_text_to_image_lora.py sets them up (see the module's docstring) ->
    (their models, a function giving the Contender for a resolution, the number of LoRA layers)."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig, inject_adapter_in_model
    models = diffusers_models(base, torch.bfloat16 if a.precision == "bf16" else torch.float32, a.device)
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    for model in (unet, text_encoder):   # what unet.add_adapter / text_encoder.add_adapter do
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        inject_adapter_in_model(LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                           target_modules=linears), model)
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:   # the script's cast_training_params
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ids = base.tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(a.batch_size)]).to(a.device)
    autocast = dict(device_type=torch.device(a.device).type, dtype=torch.bfloat16, enabled=a.precision == "bf16")

    def contender(resolution):
        g = torch.Generator().manual_seed(0)
        images = (torch.rand(a.batch_size, 3, resolution, resolution, generator=g) * 2 - 1).to(a.device, vae.dtype)

        def step():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=latents.device).long()
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.autocast(**autocast):
                context = text_encoder(ids, return_dict=False)[0]
                pred = unet(noisy, t, context, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            loss.detach().item()   # the script logs the mean loss of every step
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        return Contender(step)

    return models, contender, sum(1 for m in (unet, text_encoder) for _, x in m.named_modules() if hasattr(x, "lora_A"))


def decode_seconds(resolution):
    """Seconds to read one synthetic 512×512 8-bit film (IU X-Ray's normalised size) and resize it."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "film.png")
        film = np.random.default_rng(0).normal(128, 40, (512, 512)).clip(0, 255).astype(np.uint8)
        Image.fromarray(film).save(path)
        load_image(path, resolution)
        start = time.perf_counter()
        for _ in range(8):
            load_image(path, resolution)
        return (time.perf_counter() - start) / 8


def project(trainer, contender, t_step, a, device):
    """The IU fine-tune's parts, measured on the SeLoRA trainer at 224 px -> {part: seconds}."""
    sd, n = trainer.sd, a.batch_size
    images = torch.rand(n, 3, trainer.args.resolution, trainer.args.resolution, device=device) * 2 - 1
    with torch.no_grad(), trainer.autocast_ctx():
        encode = lambda: sd.vae.encode(images)[0].float().sum()  # noqa: E731
        encode()
        sync(device)
        start = time.perf_counter()
        encode().item()
        sync(device)
        t_encode = (time.perf_counter() - start) / n
    # a test period of `cycle` steps, every layer growing at its test (λ = 1): one period to settle, one timed
    cycle = 6
    trainer.controller.every, trainer.controller.lam = cycle, 1.0
    trainer.controller.fisher_window = 1
    ahead = (-trainer.step) % cycle
    contender.run(ahead + cycle)
    sync(device)
    start = time.perf_counter()
    contender.run(cycle)
    sync(device)
    t_period = time.perf_counter() - start + (IU["every"] - cycle) * t_step
    sync(device)
    start = time.perf_counter()
    trainer.validate()   # the loss on --val-max cached images; no grid (--val-images 0)
    t_val_image = (time.perf_counter() - start) / trainer.val_count()
    with trainer.autocast_ctx():   # as validate() samples: the frozen weights are bf16
        grid = lambda: ddim_sample(sd, PROMPTS[:IU["grid"]], steps=IU["grid_steps"], height=trainer.args.resolution,  # noqa: E731
                                   width=trainer.args.resolution, progress=False)
        grid()
        sync(device)
        start = time.perf_counter()
        grid()
        sync(device)
        t_grid = time.perf_counter() - start
    parts = {"pre-pass: decode files": IU["images"] * decode_seconds(trainer.args.resolution) / IU["workers"],
             "pre-pass: VAE encode": IU["images"] * t_encode,
             "steps between tests": (IU["steps"] - IU["steps"] // IU["every"]) * t_step,
             "tests (eager step, growth, recapture)": IU["steps"] // IU["every"] * (t_period - (IU["every"] - 1) * t_step),
             "validation loss": IU["validations"] * IU["val_images"] * t_val_image,
             "validation grids": IU["validations"] * t_grid}
    return parts


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here (rewritten after each measurement)")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: tiny model, fp32, 32 px, batch 2, a few steps")
    p.add_argument("--resolutions", type=int, nargs="+", default=[224, 512])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rank", type=int, default=4, help="every layer's rank, for all adapters")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=4, help="steps before timing (eager, then capture)")
    p.add_argument("--no-diffusers", dest="diffusers", action="store_false", help="skip the diffusers + peft rows")
    a = p.parse_args(argv)
    a.config, a.device, a.precision, a.workers, a.val_max = "sd15", "cuda", "bf16", min(8, os.cpu_count() or 1), 64
    if a.smoke:
        a.config, a.device, a.precision, a.resolutions, a.batch_size, a.steps, a.warmup, a.workers, a.val_max = \
            "tiny", "cpu", "fp32", [32], 2, 2, 3, 0, 4
        rehearse_on_cpu()
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke for the CPU rehearsal)")
    return a


def row_table(rows):
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["| px | contender | step ms | images/s | peak GiB | vs diffusers (images/s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['contender']} | {1e3 * r['seconds']:.1f} | {r['images_per_s']:.2f} "
                     f"| {fmt(r['peak_bytes'] and r['peak_bytes'] / 2 ** 30, '.2f')} | {fmt(r.get('speedup'), '.2f')} |")
    return "\n".join(lines)


@main_guard
def main(argv=None):
    a = parse(argv)
    device, env = a.device, environment(a.device)
    base = random_model(a.config, device)
    rows, targets = [], []
    results = {"args": vars(a), "rows": rows}
    save = lambda: save_results(a.json, env, targets, **results)  # noqa: E731

    def measure(name, resolution, contender, baseline):
        seconds = seconds_per_step(contender, a.steps, a.warmup, device)
        rows.append({"resolution": resolution, "contender": name, "seconds": seconds,
                     "images_per_s": a.batch_size / seconds, "peak_bytes": peak_memory(device, baseline)})
        print(f"{resolution} px, {name}: {1e3 * seconds:.1f} ms per step", flush=True)
        save()
        return rows[-1]

    selora_rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for resolution in a.resolutions:
            first = resolution == a.resolutions[0]   # where the diagnostic rows and the projection run
            rows_steps = a.warmup + a.steps
            baseline = reset_peak_memory(device)
            trainer, selora = minisd_trainer(base, "selora", resolution, a, folder,
                                             (4 if first else 2) * rows_steps + (18 if first else 2))
            controller = trainer.controller
            controller.every = 2 ** 62
            between = measure("minisd SeLoRA, between tests", resolution, selora, baseline)
            controller.every, controller.lam = 1, math.inf
            test = measure("minisd SeLoRA, test step", resolution, selora, baseline)
            selora_rows[resolution] = between, test
            controller.every = 2 ** 62
            if first and trainer.replayer is not None:
                trainer.replayer.enabled = False
                measure("minisd SeLoRA, between tests, eager", resolution, selora, baseline)
                trainer.replayer.enabled = True
            if first:
                layout = torch.channels_last if device.startswith("cuda") else torch.contiguous_format
                relayout(trainer, torch.contiguous_format)
                measure("minisd SeLoRA, between tests, no channels_last", resolution, selora, baseline)
                relayout(trainer, layout)
                results["projection"] = parts = project(trainer, selora, between["seconds"], a, device)
                print(f"projection: {sum(parts.values()):.1f} s", flush=True)
                save()
            del trainer, selora, controller
            baseline = reset_peak_memory(device)
            trainer, lora = minisd_trainer(base, "lora", resolution, a, folder, rows_steps)
            lora = measure("minisd LoRA", resolution, lora, baseline)
            del trainer
            for row in (between, test):
                row["vs_lora"] = row["seconds"] / lora["seconds"]
            targets.append(target(f"SeLoRA test step time vs LoRA of the same ranks, {resolution} px", test["vs_lora"],
                                  "x", "<= 1.03", test["vs_lora"] <= 1.03))
            save()
    if a.diffusers:   # built once for all resolutions; its peak counts its weights, as minisd's does
        baseline = reset_peak_memory(device)
        models, reference, n_layers = diffusers_reference(base, a)
        for resolution in a.resolutions:
            reset_peak_memory(device)
            ref = measure(f"diffusers + peft ({n_layers} LoRA layers)", resolution, reference(resolution), baseline)
            for row in rows:
                if row["resolution"] == resolution and row is not ref:
                    row["speedup"] = row["images_per_s"] / ref["images_per_s"]
            between, test = selora_rows[resolution]
            goal = 1.5 if resolution <= 224 else 1.3
            targets.append(target(f"training images/s vs diffusers + peft, {resolution} px (SeLoRA between tests)",
                                  between["speedup"], "x", f">= {goal}", between["speedup"] >= goal))
            if ref["peak_bytes"] is not None:
                ratio = max(between["peak_bytes"], test["peak_bytes"]) / ref["peak_bytes"]
                targets.append(target(f"training peak memory vs diffusers + peft, {resolution} px", ratio, "x",
                                      "<= 1.0", ratio <= 1.0))
            save()
        del models, reference
    if "projection" in results:
        total = sum(results["projection"].values())
        targets.append(target("paper's IU X-Ray fine-tune, projected (one GPU)", total, "s", "<= 300", total <= 300))
        save()
    print(f"# {a.config} training step, batch {a.batch_size}, {a.precision}, rank {a.rank} — {env}")
    print(row_table(rows))
    if "projection" in results:
        print("\n| IU fine-tune part | seconds |\n|---|---|")
        for name, seconds in results["projection"].items():
            print(f"| {name} | {seconds:.1f} |")
        print(f"| **total** | **{sum(results['projection'].values()):.1f}** |")
    print("\n| target | figure | goal | met |\n|---|---|---|---|")
    for t in targets:
        print(f"| {t['name']} | {t['figure']:.3g} {t['unit']} | {t['target']} | {t['met']} |")


if __name__ == "__main__":
    main()
