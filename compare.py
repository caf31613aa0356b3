"""Run the paper's comparison: LoRA, DyLoRA, AdaLoRA and SeLoRA (at each λ) × training seeds × data sets, each
cell trained by train.py and evaluated by eval.py, into tables in the form of the paper's.

    python compare.py --model tiny --data phantom --quick                       # the CPU demo, minutes
    python compare.py --model SD15 --data iuxray montgomery --data-root iuxray=DIR montgomery=DIR \\
        --lambdas 1.1 1.2 1.3 --train-seeds 0 1 2 --inception-weights PTH --clip-weights FILE

Cells are runs/NAME-DATA-METHOD[-lambdaλ]-seedS; comparisons/NAME/ gets comparison.md, comparison.csv, the
rank heat-maps ranks.png and each cell's train/eval output in logs/. Given again, the command skips what is
done and continues an interrupted cell from its checkpoint; a failed cell is reported and the grid goes on.
"""
import math
import os
import sys
import warnings

from minisd import DEFAULT_MODEL
from minisd.adapters import METHODS
from minisd.adapters.selora import ESTIMATORS
from minisd.cli import (PRECISIONS, ArgumentParser, check, check_data_root, check_finite, check_pixels, check_seed,
                        check_steps, main_guard, pick_device)
from minisd.comparison import QUICK_EVAL, QUICK_TRAIN, Grid, check_data, metric_weights, run_grid
from minisd.comparison_report import write_report
from minisd.data import DATASETS
from minisd.errors import MinisdError
from minisd.inception import DIMS

PAPER_ORDER = ["lora", "dylora", "adalora", "selora"]
TRAIN_FLAGS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "rank", "resolution", "precision",
               "expand_every", "fisher", "data_seed")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("the grid")
    g.add_argument("--name", help="comparisons/NAME and the cells' run-name prefix (default: the data sets' "
                                  "names, and -quick with --quick)")
    g.add_argument("--methods", nargs="+", choices=METHODS, default=PAPER_ORDER, metavar="METHOD",
                   help=f"adapters, in table order: of {', '.join(METHODS)} (default {' '.join(PAPER_ORDER)})")
    g.add_argument("--lambdas", type=float, nargs="+", default=[1.1], metavar="λ",
                   help="SeLoRA's λ values, one row each (default 1.1)")
    g.add_argument("--train-seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="train.py --seed of each cell (default 0)")
    g.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["phantom"], metavar="NAME",
                   help=f"data sets, one table each: of {', '.join(sorted(DATASETS))} (default phantom)")
    g.add_argument("--data-root", nargs="+", metavar="[NAME=]DIR",
                   help="data folders: DIR with one data set, NAME=DIR for each of several (default data/NAME)")
    g.add_argument("--quick", action="store_true",
                   help="a smoke run: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK_TRAIN.items())
                        + " for training, " + " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                       for k, v in QUICK_EVAL.items())
                        + " and no CLIP score unless --clip-weights for evaluation (flags given win)")
    g = p.add_argument_group("training (train.py's flags; its defaults when not given)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint file, diffusers folder, hub id, 'tiny', or a chest-X-ray LDM (its folder, 'cxr-ldm', "
                        f"'cxr-tiny') (default {DEFAULT_MODEL})")
    for flag, kind, text in (("--epochs", int, ""), ("--max-steps", int, ""), ("--batch-size", int, ""),
                             ("--grad-accum", int, ""), ("--lr", float, ""),
                             ("--rank", int, "LoRA rank, DyLoRA's r_max, AdaLoRA's target rank"),
                             ("--resolution", int, ""), ("--expand-every", int, "SeLoRA: steps between rank tests"),
                             ("--data-seed", int, "the data split, shared by every cell")):
        g.add_argument(flag, type=kind, help=text or None)
    g.add_argument("--precision", choices=PRECISIONS)
    g.add_argument("--fisher", choices=ESTIMATORS, help="SeLoRA's Fisher estimator")
    g = p.add_argument_group("evaluation (eval.py's flags)")
    g.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="sampling seeds, one image set each (default 0 1 2)")
    g.add_argument("--steps", type=int, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance (default 7.5)")
    g.add_argument("--dims", type=int, nargs="+", choices=DIMS, metavar="DIM", help=f"FID's Inception dims, of {' '.join(map(str, DIMS))} (default 64 192 2048, the paper's)")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: cache, else download)")
    g.add_argument("--force-inception-weights", action="store_true",
                   help="use --inception-weights whose SHA-256 is not pytorch-fid's (FID not comparable; warned)")
    g.add_argument("--clip-weights", help="open_clip ViT-L-14-quickgelu OpenAI weights (default: cache, else download)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, for every cell")
    return p.parse_args(argv)


def unique(flag, values):
    if len(set(values)) < len(values):
        raise MinisdError(f"{flag} {' '.join(map(str, values))}: a value is repeated")
    return values


def check_args(args):
    for flag in ("methods", "lambdas", "train_seeds", "data", "seeds"):
        if getattr(args, flag) is not None:
            unique("--" + flag.replace("_", "-"), getattr(args, flag))
    for lam in args.lambdas:
        check(math.isfinite(lam) and lam >= 1, "--lambdas", lam, "at least 1 (every FI-ratio is at least 1, so a "
              "smaller λ grows every layer at every test)")
    if args.lambdas != [1.1] and "selora" not in args.methods:
        raise MinisdError(f"--lambdas {' '.join(map(str, args.lambdas))}: λ is SeLoRA's, and --methods has no selora")
    if 1 in args.lambdas:
        warnings.warn("--lambdas 1: every FI-ratio is at least 1, so every layer grows at every test")
    for flag in ("epochs", "max_steps", "batch_size", "grad_accum", "rank", "expand_every"):
        value = getattr(args, flag)
        if value is not None:
            check(value >= 1, "--" + flag.replace("_", "-"), value, "at least 1")
    if args.lr is not None:
        check_finite("--lr", args.lr, positive=True)
    if args.resolution is not None:
        check_pixels("--resolution", args.resolution)
    for flag, seeds in (("--train-seeds", args.train_seeds), ("--seeds", args.seeds or []),
                        ("--data-seed", [] if args.data_seed is None else [args.data_seed])):
        for seed in seeds:
            check_seed(flag, seed)
    if args.steps is not None:
        check_steps("--steps", args.steps)
    if args.guidance is not None:
        check_finite("--guidance", args.guidance)
    name = args.name or "-".join(args.data) + ("-quick" if args.quick else "")
    if name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name) or not name:
        raise MinisdError(f"--name {name!r}: one folder name under comparisons/, not a path")
    return name


def data_roots(data, roots):
    """{data set: its folder or None} from --data-root DIR (one data set) or NAME=DIR ..."""
    out = dict.fromkeys(data)
    for text in roots or []:
        name, sep, folder = text.partition("=")
        if not (sep and name in out):   # a plain DIR
            if len(data) > 1:
                raise MinisdError(f"--data-root {text}: with several data sets give NAME=DIR, NAME one of "
                                  f"{' '.join(data)}")
            name, folder = data[0], text
        if not folder:
            raise MinisdError(f"--data-root {text}: no folder after {name}=")
        if out[name] is not None:
            raise MinisdError(f"--data-root: two folders for {name}")
        check_data_root(name, folder)
        out[name] = folder
    return out


def grid_of(args):
    name = check_args(args)
    train = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    evaluation = {"seeds": args.seeds, "steps": args.steps, "guidance": args.guidance, "dims": args.dims}
    if args.quick:
        quick = {k: v for k, v in QUICK_TRAIN.items() if not (k == "max_steps" and "epochs" in train)}
        train = {**quick, **train}
        evaluation = {**QUICK_EVAL, **{k: v for k, v in evaluation.items() if v is not None}}
    defaults = {"seeds": [0, 1, 2], "steps": 50, "guidance": 7.5, "dims": [64, 192, 2048]}
    evaluation = {k: evaluation.get(k) if evaluation.get(k) is not None else v for k, v in defaults.items()}
    return Grid(name=name, model=args.model, data=data_roots(args.data, args.data_root), methods=args.methods,
                lambdas=args.lambdas if "selora" in args.methods else [], train_seeds=args.train_seeds,
                train=train, evaluation=evaluation, device=pick_device(args.device))


@main_guard
def main(argv=None):
    args = parse_args(argv)
    grid = grid_of(args)
    check_data(grid)
    weights = metric_weights(args.inception_weights, args.clip_weights, clip=not args.quick,
                             force_inception_weights=args.force_inception_weights)
    if weights["missing"]:
        print(f"note: {weights['missing']}", file=sys.stderr)
    failures = run_grid(grid, os.path.dirname(os.path.abspath(__file__)), weights)
    print(write_report(grid, weights, failures))
    print(f"wrote {grid.folder}/comparison.md, comparison.csv and ranks.png", file=sys.stderr)
    if failures:
        raise MinisdError(f"{len(failures)} cell(s) failed: {', '.join(c.folder for c in failures)} (their errors are "
                          f"above and in {grid.folder}/comparison.md; the same command again retries them)")
    return grid


if __name__ == "__main__":
    main()
