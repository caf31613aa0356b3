"""The chest-X-ray LDM trained from scratch: training-step times of both stages at the paper's settings, the wall
time of the paper's whole schedule projected from them, and 50-step DDIM latency at 256², on random weights.

Steps are train.py's own (minisd.pretraining's VAETrainer / UNetTrainer.train_step: autocast, loss scaling for
fp16, the cosine learning rate, AdamW), on a batch of phantom images rendered once (data loading, which
--workers overlaps with the GPU, is not timed). VAE: batch 32, 256², L_recon + 1e-4·KL. U-Net: batch 4 × 4
accumulation, 256² images through the frozen VAE, BERT-base-sized text encoder (128 tokens), 10% prompt dropout.
The paper's schedule: 200 VAE epochs and 480 U-Net epochs over the 70% training split of IU X-Ray's 3,301
frontal images (2,311), i.e. 200 × 72 VAE steps and 480 × 144 U-Net steps; validation is not counted.
The paper: 96 h of training on an RTX 4060 and 663 ms per 256² image with 50 DDIM steps.

    python bench/cxr_ldm.py --json cxr_ldm.json      # GPU: cxr-ldm, fp16 and bf16
    python bench/cxr_ldm.py --smoke                  # CPU rehearsal on cxr-tiny at 32 px (numbers mean nothing)
"""
import argparse
import itertools
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import minisd  # noqa: E402
import train as train_script  # noqa: E402
from minisd import stage_args  # noqa: E402
from minisd.checkpoint.cxr import save_part  # noqa: E402
from minisd.cli import PRECISIONS  # noqa: E402
from minisd.pretraining import TRAINERS  # noqa: E402
from minisd.sampling import ddim_sample  # noqa: E402
from minisd.training import AUTOCAST  # noqa: E402
from common import environment, median_time, target, write_json  # noqa: E402

PROMPT = "The heart is normal in size. The mediastinum is unremarkable. Small left pleural effusion. No pneumothorax."
TRAIN_IMAGES = 2311   # 70% of IU X-Ray's 3,301 frontal images, as the split rounds it
EPOCHS = {"vae": 200, "unet": 480}
PAPER = {"hours": 96.0, "ddim_ms": 663.0}
TARGETS = {"hours": 2.0, "ddim_ms": 150.0}


def stage_trainer(stage, model, resolution, device, folder, extra=()):
    """A train.py run of `stage` at the paper's defaults (its arguments resolved as train.py resolves them)."""
    argv = ["--model", model, "--stage", stage, "--data", "phantom", "--resolution", str(resolution), "--epochs", "1",
            "--device", device, "--workers", "0", "--run-name", stage, *extra]
    args, given = train_script.parse_args(argv)
    args.data_root = os.path.join("data", "phantom")
    stage_args.prepare(args, given)
    train_script.check(args)
    return TRAINERS[stage](argparse.Namespace(**vars(args), adapter=None), os.path.join(folder, stage), False)


def step_time(trainer, precision, repeats):
    """Median seconds of one optimizer step, and the peak memory of the steps, in `precision`."""
    trainer.args.precision = precision
    trainer.autocast = AUTOCAST[precision]
    trainer.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    items = [trainer.train_set[i] for i in range(trainer.args.batch_size)]   # rendered once
    batches = itertools.repeat(items)
    if trainer.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = median_time(lambda: trainer.train_step(batches), trainer.device, repeats=repeats)
    peak = torch.cuda.max_memory_allocated() if trainer.device.startswith("cuda") else None
    return seconds, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here (rewritten after each measurement)")
    p.add_argument("--smoke", action="store_true", help="cxr-tiny at 32 px on the CPU, fp32: a rehearsal")
    p.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), help="default fp16 bf16 (smoke: fp32)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    model, resolution = ("cxr-tiny", 32) if args.smoke else ("cxr-ldm", 256)
    precisions = args.precisions or (["fp32"] if args.smoke else ["fp16", "bf16"])
    ddim_steps = 2 if args.smoke else 50
    smoke = {"vae": ["--batch-size", "4"], "unet": ["--batch-size", "2", "--grad-accum", "2"]} if args.smoke else {}
    result = {"environment": environment(device), "args": vars(args), "rows": [], "targets": []}
    torch.backends.cudnn.benchmark = True
    if args.smoke:   # tiny tensors: one thread never waits on another (on a busy CPU, seconds per step)
        torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as folder:
        vae = stage_trainer("vae", model, resolution, device, folder, smoke.get("vae", []))
        for precision in precisions:
            seconds, peak = step_time(vae, precision, args.repeats)
            result["rows"].append({"stage": "vae", "precision": precision, "images": vae.args.batch_size,
                                   "step_s": seconds, "peak_bytes": peak})
            write_json(args.json, result)
        save_part(vae.sd, "vae", os.path.join(folder, "random-vae"))
        del vae
        unet = stage_trainer("unet", model, resolution, device, folder,
                             ["--vae", os.path.join(folder, "random-vae"), *smoke.get("unet", [])])
        accumulation = f"{unet.args.batch_size} × {unet.args.grad_accum}"
        for precision in precisions:
            seconds, peak = step_time(unet, precision, args.repeats)
            result["rows"].append({"stage": "unet", "precision": precision,
                                   "images": unet.args.batch_size * unet.args.grad_accum, "step_s": seconds, "peak_bytes": peak})
            write_json(args.json, result)
        del unet

    for precision in precisions:
        sd = minisd.build(model, device=device, dtype=PRECISIONS[precision])
        seconds = median_time(lambda: ddim_sample(sd, [PROMPT], steps=ddim_steps, guidance=7.5, height=resolution,
                                                  width=resolution, progress=False), device, repeats=args.repeats)
        result["rows"].append({"stage": "ddim", "precision": precision, "images": 1, "step_s": seconds, "peak_bytes": None})
        write_json(args.json, result)

    hours = {}
    for precision in precisions:
        times = {r["stage"]: r["step_s"] for r in result["rows"] if r["precision"] == precision}
        schedule = {"vae": TRAIN_IMAGES // 32, "unet": TRAIN_IMAGES // 16}   # steps per epoch at the paper's batches
        hours[precision] = sum(EPOCHS[s] * schedule[s] * times[s] for s in EPOCHS) / 3600
    best = min(hours, key=hours.get)
    fastest = min((r for r in result["rows"] if r["stage"] == "ddim"), key=lambda r: r["step_s"])
    result["schedule_hours"] = hours
    result["targets"] = [
        target(f"paper's training schedule (200 + 480 epochs), projected, {best}", hours[best], "h",
               f"<= {TARGETS['hours']:g} h (RTX 4060: {PAPER['hours']:g} h)", hours[best] <= TARGETS["hours"]),
        target(f"{ddim_steps}-step DDIM at {resolution}², batch 1, {fastest['precision']}", fastest["step_s"] * 1000, "ms",
               f"<= {TARGETS['ddim_ms']:g} ms (RTX 4060: {PAPER['ddim_ms']:g} ms)",
               fastest["step_s"] * 1000 <= TARGETS["ddim_ms"]),
    ]
    write_json(args.json, result)

    env = result["environment"]
    print(f"# {model}, {resolution}×{resolution} — {env}" + (" — smoke run: the numbers mean nothing" if args.smoke else ""))
    print("| measurement | precision | images | time | peak memory |\n|---|---|---|---|---|")
    names = {"vae": "VAE training step", "unet": f"U-Net training step ({accumulation} accumulated)",
             "ddim": f"DDIM, {ddim_steps} steps + CFG"}
    for r in result["rows"]:
        memory = f"{r['peak_bytes'] / 2**30:.2f} GiB" if r["peak_bytes"] else "–"
        print(f"| {names[r['stage']]} | {r['precision']} | {r['images']} | {r['step_s'] * 1000:.1f} ms | {memory} |")
    for precision, h in hours.items():
        print(f"| paper's schedule, projected | {precision} | {EPOCHS['vae']} + {EPOCHS['unet']} epochs | {h:.2f} h | – |")
    for t in result["targets"]:
        print(f"target: {t['name']}: {t['figure']:.3g} {t['unit']} ({t['target']}): {'met' if t['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
