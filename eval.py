"""Evaluate generated images: FID (Inception dims 64/192/768/2048), KID, CLIP score, SSIM/PSNR.

  python eval.py --real DIR --fake DIR [--prompts FILE]          two image folders
  python eval.py --model M --adapter A --data NAME --data-root D  generate from the test prompts, per seed
  python eval.py                                                  the most recent run in runs/

Writes eval.json and eval.md (and grid.png) to --out and prints the Markdown table.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import minisd
from minisd.cli import (PRECISIONS, ArgumentParser, check, check_data_root, check_finite, check_pixels, check_seed,
                        check_steps, main_guard, output_folder, pick_device, warn_half_precision_on_cpu)
from minisd.errors import MinisdError
from minisd.evaluation import evaluate_folders, evaluate_model, latest_run, markdown, save_grid
from minisd.inception import DIMS, RESIZE_MODE


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("two folders")
    g.add_argument("--real", help="folder of real images")
    g.add_argument("--fake", help="folder of generated images")
    g.add_argument("--prompts", help="text file, one prompt per line, in the sorted order of the --fake files "
                                     "(adds the CLIP score)")
    g = p.add_argument_group("a model, end to end")
    g.add_argument("--model", help="checkpoint file, diffusers folder, hub id or 'tiny' "
                                   f"(default {minisd.DEFAULT_MODEL})")
    g.add_argument("--adapter", help="adapter .safetensors written by train.py")
    g.add_argument("--data", help="data set name: iuxray, montgomery, folder, phantom")
    g.add_argument("--data-root", help="data folder (default data/NAME)")
    g.add_argument("--split", default="test")
    g.add_argument("--data-seed", type=int,
                   help="seed of the data split: train.py's --seed (default: the run's, else 0)")
    g.add_argument("--resolution", type=int, help="image size (default: the run's, else 224)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one image set per seed; with N prompts, image k of seed s starts from noise seed s*N+k")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--guidance", type=float, default=7.5)
    g.add_argument("--sample-batch-size", type=int, default=8)
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the diffusion model while sampling")
    g = p.add_argument_group("metrics")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: cache, else download)")
    g.add_argument("--clip-weights", help="open_clip ViT-L-14-quickgelu OpenAI weights (default: cache, else download)")
    g.add_argument("--dims", type=int, nargs="+", choices=DIMS, default=list(DIMS), help="Inception dims for FID")
    g.add_argument("--kid-subset-size", type=int, help="default: min(1000, number of images)")
    g.add_argument("--kid-subsets", type=int, default=100)
    g.add_argument("--batch-size", type=int, default=50)
    g.add_argument("--device", default="auto")
    g.add_argument("--out", help="output folder (default eval/, or runs/NAME/eval for a run)")
    return p.parse_args(argv)


def resolve_mode(args):
    """Fill the model-mode arguments from the latest run when no mode is given; returns 'folders' or 'model'."""
    if args.real or args.fake:
        if not (args.real and args.fake):
            raise MinisdError("--real and --fake go together: give both folders")
        if args.model or args.data or args.adapter:
            raise MinisdError("give either --real/--fake folders or --model/--data, not both")
        args.out = args.out or "eval"
        return "folders"
    if args.prompts:
        raise MinisdError("--prompts needs --real and --fake (with --data the prompts come from the data set)")
    if not (args.model or args.data or args.adapter):
        run, record = latest_run()
        adapter = Path(record.get("adapter") or run / "adapter.safetensors")
        if not adapter.is_file():
            raise MinisdError(f"{adapter}: not found (has the run finished?); pass --adapter PATH")
        args.model, args.data, args.adapter = record["model"], record["data"], str(adapter)
        check_data_root(args.data, args.data_root)
        args.data_root = args.data_root or record.get("data_root")
        args.resolution = args.resolution or record.get("resolution")
        args.data_seed = record.get("seed", 0) if args.data_seed is None else args.data_seed
        args.out = args.out or str(run / "eval")
        print(f"evaluating run {run}: model {args.model}, data {args.data}, split {args.split}", file=sys.stderr)
    elif not args.data:
        raise MinisdError("--model/--adapter need --data NAME for the test prompts and real images")
    else:
        check_data_root(args.data, args.data_root)
    args.model = args.model or minisd.DEFAULT_MODEL
    args.data_seed = args.data_seed or 0
    args.out = args.out or "eval"
    return "model"


def check_args(args):
    for flag in ("batch_size", "sample_batch_size", "kid_subsets"):
        check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')}", getattr(args, flag), "at least 1")
    if args.kid_subset_size is not None:
        check(args.kid_subset_size >= 2, "--kid-subset-size", args.kid_subset_size, "at least 2")
    check_steps("--steps", args.steps)
    check_finite("--guidance", args.guidance)
    if args.resolution is not None:
        check_pixels("--resolution", args.resolution)
    if args.data_seed is not None:
        check_seed("--data-seed", args.data_seed)
    for seed in args.seeds:
        check_seed("--seeds", seed)
    if len(set(args.seeds)) < len(args.seeds):
        raise MinisdError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated (each gives one image set)")


@main_guard
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    mode = resolve_mode(args)
    device = pick_device(args.device)
    if mode == "model":
        warn_half_precision_on_cpu(args.precision, device)
    out = Path(output_folder("--out", args.out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, rows = (evaluate_folders if mode == "folders" else evaluate_model)(args, device)
    messages = []  # warnings about the numbers; deprecations are about code
    for w in caught:
        if not issubclass(w.category, DeprecationWarning) and str(w.message) not in messages:
            messages.append(str(w.message))
    report["resize_mode"] = RESIZE_MODE
    report.setdefault("truncated_prompts", 0)
    report["warnings"] = messages
    table = markdown(report)
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    (out / "eval.md").write_text(table)
    save_grid(rows, out / "grid.png")
    for m in messages:
        print(f"warning: {m}", file=sys.stderr)
    print(table)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'grid.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
