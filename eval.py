"""Evaluate generated images: FID (Inception dims 64/192/768/2048), KID, CLIP score, SSIM/PSNR.

  python eval.py --real DIR --fake DIR [--prompts FILE]          two image folders
  python eval.py --model M --adapter A --data NAME --data-root D  generate from the test prompts, per seed
  python eval.py                                                  the most recent run in runs/

Writes eval.json and eval.md (and grid.png) to --out and prints the Markdown table.
"""
import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import minisd
from minisd import metrics
from minisd.cli import PRECISIONS, main_guard, pick_device
from minisd.errors import MinisdError
from minisd.images import grid, save_png
from minisd.inception import DIMS, RESIZE_MODE, load_inception, sha256_file, weights_path

GRID_COLUMNS = 8


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
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


# ---------------------------------------------------------------------------------------------- evaluation

class Evaluator:
    """The networks, loaded once, and the metrics of one generated set against the real set."""

    def __init__(self, args, device, with_clip):
        path = weights_path(args.inception_weights)
        self.weights = {"path": str(path), "sha256": sha256_file(path)}
        self.inception = load_inception(path, device)
        self.clip = metrics.load_clip(args.clip_weights, device) if with_clip else None
        self.args, self.device = args, device
        self.real_features = None

    def __call__(self, real, fake, pairs=None, prompts=None):
        """real, fake: lists of image files or tensors; pairs: [(real, fake)] for SSIM/PSNR; prompts per fake."""
        a = self.args
        if self.real_features is None:
            self.real_features = metrics.cached_features(self.inception, real, self.weights["sha256"], RESIZE_MODE,
                                                         a.dims, a.batch_size, self.device)
        fake_features = metrics.inception_features(self.inception, fake, a.dims, a.batch_size, self.device,
                                                   desc="inception (generated)")
        result = {"images": {"real": len(real), "generated": len(fake)}}
        result["fid"] = {str(d): v for d, v in metrics.fid(self.real_features, fake_features).items()}
        kid_dim = max(a.dims)
        subset = a.kid_subset_size or min(1000, len(real), len(fake))
        mean, std = metrics.kid(self.real_features[kid_dim], fake_features[kid_dim], subset, a.kid_subsets)
        result["kid"] = {"mean": mean, "std": std, "dims": kid_dim, "subset_size": subset, "subsets": a.kid_subsets}
        result["clip_score"] = None
        if prompts is not None:
            clip = metrics.clip_score(fake, prompts, self.clip, a.batch_size, self.device)
            result["clip_score"] = {"mean": clip["mean"], "std": clip["std"], "per_image": clip["scores"]}
            result["truncated_prompts"] = clip["truncated"]
        result["ssim"] = result["psnr"] = None
        if pairs:
            ssim = [metrics.ssim(r, f) for r, f in pairs]
            psnr = [metrics.psnr(r, f) for r, f in pairs]
            result["ssim"] = {"mean": float(np.mean(ssim)), "std": float(np.std(ssim)), "pairs": len(pairs)}
            result["psnr"] = {"mean": float(np.mean(psnr)), "std": float(np.std(psnr)), "pairs": len(pairs)}
        return result


def read_prompts(path, n_images):
    try:
        prompts = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MinisdError(f"--prompts {path}: cannot read ({e})") from None
    if len(prompts) != n_images:
        raise MinisdError(f"--prompts {path}: {len(prompts)} prompts for {n_images} generated images "
                          f"(want one line per image, in sorted file order)")
    return prompts


def name_pairs(real_files, fake_files):
    """(real, fake) files with the same name stem, if every fake has one; else None with a warning."""
    by_stem = {f.stem: f for f in real_files}
    pairs = [(by_stem[f.stem], f) for f in fake_files if f.stem in by_stem]
    if len(pairs) < len(fake_files):
        if pairs:
            warnings.warn(f"SSIM/PSNR skipped: only {len(pairs)} of {len(fake_files)} generated files have a real "
                          f"file of the same name")
        return None
    images = [(metrics.load_image(r), metrics.load_image(f)) for r, f in pairs]
    for (r, f), (a, b) in zip(pairs, images):
        if a.shape != b.shape:
            warnings.warn(f"SSIM/PSNR skipped: {r} and {f} differ in size")
            return None
    return images


def evaluate_folders(args, device):
    real, fake = metrics.list_images(args.real), metrics.list_images(args.fake)
    prompts = read_prompts(args.prompts, len(fake)) if args.prompts else None
    evaluate = Evaluator(args, device, with_clip=prompts is not None)
    result = evaluate(real, fake, name_pairs(real, fake), prompts)
    if result["clip_score"]:
        result["clip_score"]["per_image"] = dict(zip((f.name for f in fake), result["clip_score"]["per_image"]))
    n = min(len(real), len(fake), GRID_COLUMNS)
    rows = [[metrics.to_unit(x) for x in real[:n]], [metrics.to_unit(x) for x in fake[:n]]]
    return {"mode": "folders", "real": str(args.real), "fake": str(args.fake), **result,
            "inception_weights": evaluate.weights}, rows


def latest_run(runs="runs"):
    records = sorted(Path(runs).glob("*/args.json"), key=lambda p: p.stat().st_mtime)
    if not records:
        raise MinisdError(f"no run in {runs}/ to evaluate: pass --real DIR --fake DIR, or --data NAME "
                          f"[--model M --adapter A], or train one with train.py")
    record = records[-1]
    try:
        return record.parent, json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MinisdError(f"{record}: cannot read ({e})") from None


def evaluate_model(args, device):
    from minisd.data import load_dataset
    from minisd.sampling import ddim_sample
    resolution = args.resolution or 224
    data_root = args.data_root or os.path.join("data", args.data)
    items = list(load_dataset(args.data, data_root, split=args.split, resolution=resolution, seed=args.data_seed))
    if not items:
        raise MinisdError(f"--data {args.data} --split {args.split}: no samples in {data_root}")
    prompts = [item["prompt"] for item in items]
    real = [((item["image"].float() + 1) / 2).clamp(0, 1) for item in items]
    evaluate = Evaluator(args, device, with_clip=True)  # weights are checked before the long generation
    sd = minisd.load(args.model, device=device, dtype=PRECISIONS[args.precision])
    if args.adapter:
        from minisd.adapters import load_adapter
        load_adapter(sd, args.adapter)
    out, per_seed, generated = Path(args.out), {}, []
    for seed in args.seeds:
        noise_seed = seed * len(prompts)
        images = ddim_sample(sd, prompts, steps=args.steps, guidance=args.guidance, height=resolution,
                             width=resolution, seed=noise_seed, batch_size=args.sample_batch_size)
        fake = [metrics.to_uint8(x) for x in images]  # evaluate what the PNGs hold
        folder = out / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        manifest = []
        for k, (item, image) in enumerate(zip(items, fake)):
            name = f"{k:04d}-{str(item['id']).replace(os.sep, '_')}.png"
            save_png(metrics.to_unit(image), folder / name)
            manifest.append({"file": name, "id": item["id"], "prompt": item["prompt"], "noise_seed": noise_seed + k})
        (folder / "prompts.json").write_text(json.dumps(manifest, indent=1))
        per_seed[str(seed)] = evaluate(real, fake, list(zip(real, fake)), prompts)
        generated.append(fake)
    n = min(len(real), GRID_COLUMNS)
    rows = [real[:n]] + [[metrics.to_unit(x) for x in fake[:n]] for fake in generated]
    numbers = [scalars(r) for r in per_seed.values()]
    summary = {}
    for name in numbers[0]:
        values = [x[name] for x in numbers]
        summary[name] = {"mean": float(np.mean(values)), "std": float(np.std(values))}  # std with ddof=0
    return {"mode": "model", "model": args.model, "adapter": args.adapter, "data": args.data, "data_root": data_root,
            "split": args.split, "data_seed": args.data_seed, "resolution": resolution, "seeds": args.seeds,
            "steps": args.steps, "guidance": args.guidance, "summary": summary, "per_seed": per_seed,
            "truncated_prompts": next(iter(per_seed.values()))["truncated_prompts"],
            "images": next(iter(per_seed.values()))["images"], "inception_weights": evaluate.weights}, rows


# ---------------------------------------------------------------------------------------------- report

LABELS = {"clip_score": "CLIP score", "ssim": "SSIM", "psnr": "PSNR (dB)"}


def scalars(result, key="mean"):
    """The headline numbers (or with key="std" their spread) of one result, by table label."""
    out = {f"FID-{d}": v for d, v in result["fid"].items()} if key == "mean" else {}
    out[f"KID ({result['kid']['dims']}-d)"] = result["kid"][key]
    out.update({label: result[k][key] for k, label in LABELS.items() if result[k]})
    return out


def fmt(x):
    if x is None or not math.isfinite(x):
        return str(x)
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4g}"


def markdown(report):
    if report["mode"] == "folders":
        lines = ["| metric | value |", "|---|---|"]
        spread = scalars(report, "std")
        for name, value in scalars(report).items():
            lines.append(f"| {name} | {fmt(value)}" + (f" ± {fmt(spread[name])}" if name in spread else "") + " |")
        lines.append(f"| images | {report['images']['real']} real, {report['images']['generated']} generated |")
        lines.append("")
        lines.append("± is the std over KID subsets, and over images for CLIP score, SSIM and PSNR.")
    else:
        seeds = list(report["per_seed"])
        lines = [f"| metric | mean ± std over {len(seeds)} seeds | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                 "|---|---|" + "---|" * len(seeds)]
        per_seed = [scalars(r) for r in report["per_seed"].values()]
        for name, stat in report["summary"].items():
            lines.append(f"| {name} | {fmt(stat['mean'])} ± {fmt(stat['std'])} | "
                         + " | ".join(fmt(r[name]) for r in per_seed) + " |")
        lines.append(f"| images | {report['images']['real']} real, {report['images']['generated']} per seed |")
    lines += ["", f"Inception weights sha256 {report['inception_weights']['sha256'][:16]}…, resize: {RESIZE_MODE}."]
    for w in report["warnings"]:
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


def save_grid(rows, path, tile=128):
    """Rows of images (real first, then each generated set) as one PNG of tile x tile cells."""
    tiles = torch.cat([F.interpolate(x[None], size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
                       for row in rows for x in row])
    save_png(grid(tiles, columns=len(rows[0])), path)


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
        missing = [k for k in ("model", "data") if k not in record]
        if missing:
            raise MinisdError(f"{run / 'args.json'}: no {' or '.join(missing)} recorded")
        adapter = Path(record.get("adapter") or run / "adapter.safetensors")
        if not adapter.is_file():
            raise MinisdError(f"{adapter}: not found (has the run finished?); pass --adapter PATH")
        args.model, args.data, args.adapter = record["model"], record["data"], str(adapter)
        args.data_root = args.data_root or record.get("data_root")
        args.resolution = args.resolution or record.get("resolution")
        args.data_seed = record.get("seed", 0) if args.data_seed is None else args.data_seed
        args.out = args.out or str(run / "eval")
        print(f"evaluating run {run}: model {args.model}, data {args.data}, split {args.split}", file=sys.stderr)
    if not args.data:
        raise MinisdError("--model/--adapter need --data NAME for the test prompts and real images")
    args.model = args.model or minisd.DEFAULT_MODEL
    args.data_seed = args.data_seed or 0
    args.out = args.out or "eval"
    return "model"


def check_args(args):
    for flag in ("batch_size", "sample_batch_size", "kid_subsets", "steps", "resolution"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise MinisdError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.kid_subset_size is not None and args.kid_subset_size < 2:
        raise MinisdError(f"--kid-subset-size must be at least 2, got {args.kid_subset_size}")


@main_guard
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    mode = resolve_mode(args)
    device = pick_device(args.device)
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
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
