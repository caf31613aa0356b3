"""Fine-tune SD-1.5 with SeLoRA (or LoRA, DyLoRA, AdaLoRA) on an image–text data set, or train the chest-X-ray
LDM from scratch (--stage vae, then --stage unet).

    python train.py --model tiny --data phantom                       # CPU demo, a few minutes
    python train.py --data iuxray --data-root DIR --lambda 1.1        # SeLoRA on IU X-Ray
    torchrun --nproc_per_node 4 train.py --data iuxray ...            # several GPUs
    python train.py --resume NAME                                     # continue runs/NAME after a stop
    python train.py --model cxr-ldm --stage vae --data iuxray --run-name vae             # the VAE, then
    python train.py --model cxr-ldm --stage unet --vae runs/vae --data iuxray \\
        --text-encoder dmis-lab/biobert-base-cased-v1.1 --run-name ldm               # the U-Net: runs/ldm/model
"""
import argparse
import datetime
import os
import sys
import warnings

import minisd
from minisd.adapters import METHODS
from minisd.adapters.selora import ESTIMATORS, check_lambda
from minisd.cli import (PRECISIONS, RUNS, ArgumentParser, check_data_root, check_finite, check_seed, check_steps,
                        check_window, data_seed_of, main_guard, pick_device, read_run_record, run_folder, run_name,
                        split_fractions)
from minisd.cxr.model import native_resolution
from minisd.data import DATASETS
from minisd.errors import MinisdError
from minisd.pretraining import TRAINERS
from minisd.runs import PLACE_ARGS
from minisd import stage_args
from minisd.stopping import Interrupted
from minisd.training import Trainer

# The tiny model is the CPU demo: its defaults keep a run to a few minutes on a laptop while still
# holding two SeLoRA tests at --expand-every 40 and no attention level at a single latent pixel.
TINY_DEFAULTS = {"max_steps": 80, "resolution": 128, "val_max": 64}
# The SeLoRA authors' released code: alpha 8 at rank 1 (s = 8), λ 1.3, no prompt dropout, squared batch
# gradients. Flags given on the command line override a preset's values.
PRESETS = {"authors": {"alpha": 8.0, "lam": 1.3, "cfg_dropout": 0.0, "fisher": "batch"}}
# Flags absent from older runs' records, with what such a run did: Fisher information per sample, a validation
# at every epoch's end, the data set's own split, ... (and its split drawn with --seed: data_seed_of).
OLDER_RUNS = {"fisher": "sample", "preset": None, "val_every": 1, "tensorboard": False, "window": None, "split": None,
              "stage": None, **dict.fromkeys(stage_args.STAGE_FLAGS), "cache_latents": True,
              "cache_latents_to_disk": False}


def parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--model", default=minisd.DEFAULT_MODEL,
                   help="single .safetensors/.ckpt file, diffusers folder, hub id, 'tiny', or a chest-X-ray LDM "
                        "(its folder, 'cxr-ldm', 'cxr-tiny')")
    p.add_argument("--data", default="phantom", choices=sorted(DATASETS), help="data set")
    p.add_argument("--data-root", help="data folder (default data/<name>)")
    p.add_argument("--method", choices=METHODS, help="adapter (default selora; none with --stage)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank, DyLoRA's r_max, AdaLoRA's target rank (SeLoRA starts at 1)")
    p.add_argument("--alpha", type=float, default=1.0, help="scale s = alpha / initial rank")
    p.add_argument("--lambda", dest="lam", type=float, default=1.1, help="SeLoRA: grow a layer when its FI-ratio ≥ λ")
    p.add_argument("--expand-every", type=int, default=40, help="SeLoRA: steps between rank tests")
    p.add_argument("--max-rank", type=int, help="SeLoRA: cap on any layer's rank")
    p.add_argument("--fisher-window", type=int, default=1, help="SeLoRA: steps of Fisher information accumulated per test")
    p.add_argument("--fisher", choices=ESTIMATORS, default="sample",
                   help="SeLoRA: Fisher information per sample (the paper's Eq. 3) or from squared batch gradients "
                        "(the authors' code)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="authors: alpha 8, --lambda 1.3, --cfg-dropout 0, --fisher batch (flags given win)")
    g = p.add_argument_group("training the chest-X-ray LDM from scratch (defaults: the paper's settings)")
    g.add_argument("--stage", choices=stage_args.STAGES,
                   help="train --model cxr-ldm (or cxr-tiny) from scratch: vae (defaults --epochs 200 --batch-size 32 "
                        "--lr-end 0), then unet on its --vae (--epochs 480 --batch-size 4 --grad-accum 4 --lr-end 4.62e-5 "
                        "--cfg-dropout 0.1); both AdamW, --lr 1e-4 cosine, --split 70/10/20, the model's resolution")
    g.add_argument("--vae", metavar="RUN", help="--stage unet: the --stage vae run (runs/NAME), a cxr-ldm folder or a VAE folder")
    g.add_argument("--text-encoder", metavar="BERT",
                   help="--stage unet: a BERT folder or hub id (dmis-lab/biobert-base-cased-v1.1) as the text encoder "
                        "(default: a random one with a character vocabulary)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights, which validation and the files use")
    g.add_argument("--weight-decay", type=float, help="AdamW's (default 0.01)")
    g.add_argument("--lr-end", type=float, help="the cosine schedule's last learning rate")
    g.add_argument("--kl-weight", type=float, help="--stage vae: loss = reconstruction MSE + this × KL (default 1e-4)")
    p.add_argument("--convs", action="store_true", help="also adapt the U-Net's 1×1 proj_in/proj_out convolutions")
    p.add_argument("--freeze-text-encoder", action="store_true", help="adapt the U-Net only")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training split (unless --max-steps)")
    p.add_argument("--max-steps", type=int, help=f"stop after this many optimizer steps (tiny model: {TINY_DEFAULTS['max_steps']})")
    p.add_argument("--batch-size", type=int, default=8, help="images per process per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (no weight decay)")
    p.add_argument("--resolution", type=int, help=f"image size in pixels (default 224; tiny model: {TINY_DEFAULTS['resolution']})")
    p.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                   help="linear window for DICOM films, in place of their own VOI LUT or window")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast precision; adapters stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")
    p.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=True,
                   help="encode every training image once before training (and, with --freeze-text-encoder, "
                        "every prompt); --no-cache-latents encodes each batch at every step")
    p.add_argument("--cache-latents-to-disk", action="store_true",
                   help="also keep the encoded latents in the run folder, so that --resume does not encode again")
    p.add_argument("--cfg-dropout", type=float, default=0.0,
                   help="probability of training on the empty prompt (the paper, diffusers and kohya: 0)")
    p.add_argument("--val-max", type=int,
                   help=f"validation loss on the first N validation images (default all; tiny model: {TINY_DEFAULTS['val_max']})")
    p.add_argument("--val-images", type=int, default=4, help="images in the sample grid at each validation")
    p.add_argument("--val-steps", type=int, default=25, help="DDIM steps of the validation samples")
    p.add_argument("--val-every", type=int, default=100,
                   help="validate at the end of an epoch at most every this many steps (and at the last step)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (also at each validation)")
    p.add_argument("--seed", type=int, default=0, help="adapter initialisation, batch order and noise")
    p.add_argument("--data-seed", type=int, default=0,
                   help="the train/val/test split (and the phantom's images): a property of the data, not of the run")
    p.add_argument("--split", metavar="TRAIN/VAL/TEST",
                   help="split percentages, e.g. 70/10/20 or 80/20 (default: the data set's own; --stage: 70/10/20)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="data loading processes (default 4 on a GPU, 0 on the CPU)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log loss, lr, images/s, ranks and sample grids to runs/NAME/tensorboard (needs tensorboard)")
    p.add_argument("--run-name", help=f"folder under {RUNS}/ (default DATA-METHOD-TIME)")
    p.add_argument("--resume", nargs="?", const="", metavar="NAME",
                   help="continue runs/NAME (default --run-name, else the latest run) from its checkpoint; "
                        "with a larger --max-steps or --epochs, a finished run goes on")
    return p


RESUME_FLAGS = {"resume", *PLACE_ARGS}


def parse_args(argv):
    """The arguments, and the names of those given on the command line (not left at their defaults)."""
    p = parser()
    defaults, unset = vars(p.parse_args([])), object()
    args = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(defaults, unset)))
    given = {k for k, v in vars(args).items() if v is not unset}
    for k in defaults.keys() - given:
        setattr(args, k, defaults[k])
    return args, given


def check(args):
    if args.resolution is not None and args.resolution < 1:   # checked before 224 fills in for None
        raise MinisdError(f"--resolution must be at least 1, got {args.resolution}")
    args.resolution = args.resolution or native_resolution(args.model) or 224
    positive = ["rank", "expand_every", "fisher_window", "epochs", "batch_size", "grad_accum", "resolution", "save_every",
                "val_every"]
    for name in positive + (["max_steps"] if args.max_steps is not None else []) + (["max_rank"] if args.max_rank is not None else []) \
            + (["val_max"] if args.val_max is not None else []):
        if getattr(args, name) < 1:
            raise MinisdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.resolution % 8:
        raise MinisdError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if not 0.0 <= args.cfg_dropout <= 1.0:
        raise MinisdError(f"--cfg-dropout is a probability, got {args.cfg_dropout}")
    for flag, value in (("--lr", args.lr), ("--alpha", args.alpha), ("--lambda", args.lam)):
        check_finite(flag, value, positive=True)
    check_lambda(args.lam)
    if args.method == "selora" and args.lam == 1:
        warnings.warn("--lambda 1: every FI-ratio is at least 1, so every layer grows at every test "
                      "(rank 1 + steps / --expand-every everywhere)")
    check_seed("--seed", args.seed)
    check_seed("--data-seed", args.data_seed)
    split_fractions("--split", args.split)
    stage_args.check(args)
    check_steps("--val-steps", args.val_steps)
    if args.window is not None:
        check_window("--window", args.window)
    if args.workers is not None and args.workers < 0:
        raise MinisdError(f"--workers must be 0 or more, got {args.workers}")
    if args.val_images < 0:
        raise MinisdError(f"--val-images must be 0 or more, got {args.val_images}")


def default_workers(device):
    return min(4, os.cpu_count() or 1) if device.startswith("cuda") else 0


def latest_run():
    runs = [os.path.join(RUNS, d) for d in os.listdir(RUNS)] if os.path.isdir(RUNS) else []
    runs = [r for r in runs if os.path.exists(os.path.join(r, "args.json"))]
    if not runs:
        raise MinisdError(f"--resume: no run found in {RUNS}/")
    return os.path.basename(max(runs, key=os.path.getmtime))


def resume_args(args, given):
    """The recorded arguments of the run to resume, in the folder named (a copied or renamed folder is its own
    run), with what a resumed run may change: the device, the workers, logging, and a longer run."""
    if args.resume and args.run_name and run_name("--resume", args.resume) != run_name("--run-name", args.run_name):
        raise MinisdError(f"--resume {args.resume} and --run-name {args.run_name} name different runs")
    name = run_name("--resume", args.resume or args.run_name or latest_run())
    folder = run_folder("--resume", name)
    try:
        recorded_by_all = [k for k in vars(args) if k not in ("resume", "data_seed", *OLDER_RUNS)]
        saved = read_run_record(folder, required=recorded_by_all,
                                parser=parser())
    except MinisdError as e:
        raise MinisdError(f"--resume {name}: {e}") from None
    saved = {**OLDER_RUNS, **saved, "data_seed": data_seed_of(saved)}
    changed = sorted(k for k in given - RESUME_FLAGS if getattr(args, k) != saved[k])
    if changed:
        flag = changed[0]
        raise MinisdError(f"--resume continues a run with its recorded arguments: --{flag.replace('_', '-')} "
                          f"{getattr(args, flag)} differs from the run's {saved[flag]} (only --device, --workers, "
                          f"--tensorboard, the latent caching flags, and --max-steps or --epochs to extend it, can change)")
    resumed = argparse.Namespace(**saved)
    try:
        check(resumed)
    except MinisdError as e:   # a hand-edited value out of range
        raise MinisdError(f"--resume {name}: {os.path.join(folder, 'args.json')}: {e}") from None
    resumed.run_name, resumed.adapter = name, os.path.join(folder, "adapter.safetensors")
    for key in ("max_steps", "epochs", "tensorboard", "cache_latents", "cache_latents_to_disk"):
        if key in given:
            setattr(resumed, key, getattr(args, key))
    if "epochs" in given and "max_steps" not in given:
        resumed.max_steps = None   # --epochs N asks for N epochs, not the recorded step count
    resumed.device = pick_device(args.device)
    resumed.workers = default_workers(resumed.device) if args.workers is None else args.workers
    return resumed, saved


@main_guard
def main(argv=None):
    args, given = parse_args(argv)
    saved = None
    if args.resume is not None:
        args, saved = resume_args(args, given)
    else:
        for name, value in PRESETS.get(args.preset, {}).items():
            if name not in given:
                setattr(args, name, value)
        for name, value in TINY_DEFAULTS.items():
            if args.model == "tiny" and getattr(args, name) is None:
                setattr(args, name, value)
        check_data_root(args.data, args.data_root)
        args.data_root = args.data_root or os.path.join("data", args.data)
        stage_args.prepare(args, given)
        check(args)
        kind = args.method or args.stage
        args.run_name = run_name("--run-name", args.run_name or f"{args.data}-{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        args.device = pick_device(args.device)
        args.workers = default_workers(args.device) if args.workers is None else args.workers
    path = run_folder("--run-name", args.run_name)
    resume = saved is not None and os.path.exists(os.path.join(path, "checkpoint.pt"))
    record = {k: v for k, v in vars(args).items() if k != "resume"}
    record["adapter"] = os.path.join(path, "adapter.safetensors") if args.stage is None else None
    trainer = TRAINERS.get(args.stage, Trainer)(argparse.Namespace(**record), path, resume)
    if resume:
        check_extension(trainer, saved, path)
    trainer.run.save_json("args.json", record)   # on resume too: a copied run records its own name
    try:
        with trainer.stop:
            trainer.fit()
    except Interrupted as stop:
        if trainer.run.writer:
            print(f"interrupted at step {stop.step}; resume with: python train.py --resume {args.run_name}", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:
        trainer.run.close()


def check_extension(trainer, saved, path):
    """A resumed run may end later than recorded, never before its checkpoint; AdaLoRA's budget schedule is
    fixed by its total steps."""
    if trainer.total_steps < trainer.step:
        raise MinisdError(f"{path} is at step {trainer.step}: a run of {trainer.total_steps} steps would end before "
                          f"it (give a larger --max-steps or --epochs to continue it)")
    recorded = saved["max_steps"] or saved["epochs"] * trainer.steps_per_epoch
    if (trainer.args.method == "adalora" or trainer.args.stage) and trainer.total_steps != recorded:
        schedule = "a --stage run's cosine learning rate" if trainer.args.stage else "an adalora run's rank budget schedule"
        raise MinisdError(f"--max-steps/--epochs: {schedule} follows its {recorded} steps, so it cannot be extended")
    if trainer.step == trainer.total_steps and trainer.run.writer:
        print(f"{path} finished at step {trainer.step}; to continue it give --max-steps or --epochs beyond that")


if __name__ == "__main__":
    main()
