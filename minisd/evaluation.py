"""The evaluation protocol: metrics of generated images against real ones, from two folders or from a
model generating one image per test prompt per seed, and the Markdown report."""
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics, xrv
from .cli import PRECISIONS, read_run_record, split_fractions
from .errors import MinisdError
from .files import atomic_json
from .images import grid, save_png
from .inception import RESIZE_MODE, load_inception, sha256_file, verify_weights, weights_path
from .model import load

GRID_COLUMNS = 8


class Evaluator:
    """The networks, loaded once, and the metrics of one generated set against the real set."""

    def __init__(self, args, device, with_clip):
        path = weights_path(args.inception_weights)
        self.weights = {"path": str(path), "sha256": sha256_file(path)}
        verify_weights(path, self.weights["sha256"], args.force_inception_weights)
        self.inception = load_inception(path, device)
        self.clip = self.clip_weights = None
        if with_clip and not args.no_clip:
            self.clip = metrics.load_clip(args.clip_weights, device)
            clip_file = metrics.clip_weights_file(args.clip_weights)
            self.clip_weights = {"path": str(clip_file), "sha256": sha256_file(clip_file)}
        self.xrv, xrv_path = xrv.load_xrv(args.xrv_weights, device) if args.features == "xrv" else (None, None)
        self.xrv_weights = xrv.weights_record(xrv_path) if self.xrv else None
        self.args, self.device = args, device
        self.real_features = self.real_xrv = None

    def record(self):
        """Which feature networks, and the hashes of their weights, for eval.json."""
        out = {"features": ["inception"] + (["xrv"] if self.xrv else []), "inception_weights": self.weights,
               "clip_weights": self.clip_weights}
        return {**out, "xrv_weights": self.xrv_weights} if self.xrv else out

    def __call__(self, real, fake, pairs=None, prompts=None):
        """real, fake: lists of image files or tensors; pairs: [(real, fake)] for SSIM/PSNR; prompts per fake."""
        a = self.args
        if self.real_features is None:
            self.real_features = metrics.cached_features(self.inception, real, self.weights["sha256"], RESIZE_MODE,
                                                         a.dims, a.batch_size, self.device, window=a.window)
        fake_features = metrics.inception_features(self.inception, fake, a.dims, a.batch_size, self.device,
                                                   desc="inception (generated)")
        result = {"images": {"real": len(real), "generated": len(fake)}}
        result["fid"] = {str(d): v for d, v in metrics.fid(self.real_features, fake_features).items()}
        kid_dim = max(a.dims)
        subset = a.kid_subset_size or min(1000, len(real), len(fake))
        mean, std = metrics.kid(self.real_features[kid_dim], fake_features[kid_dim], subset, a.kid_subsets)
        result["kid"] = {"mean": mean, "std": std, "dims": kid_dim, "subset_size": subset, "subsets": a.kid_subsets}
        if self.xrv:
            result["xrv"] = self.xrv_metrics(real, fake, subset)
        result["clip_score"] = None
        if prompts is not None and self.clip is not None:
            clip = metrics.clip_score(fake, prompts, self.clip, a.batch_size, self.device)
            result["clip_score"] = {"mean": clip["mean"], "std": clip["std"], "per_image": clip["scores"]}
            result["truncated_prompts"] = clip["truncated"]
        result["ssim"] = result["psnr"] = None
        if pairs:
            ssim = [metrics.ssim(r, f) for r, f in pairs]
            psnr = [metrics.psnr(r, f) for r, f in pairs]
            result["ssim"] = {**mean_std(ssim), "pairs": len(pairs)}
            result["psnr"] = {**mean_std(psnr), "pairs": len(pairs)}
        return result

    def xrv_metrics(self, real, fake, subset):
        """FID and KID on the chest-X-ray features (minisd.xrv)."""
        a = self.args
        if self.real_xrv is None:
            self.real_xrv = xrv.features(self.xrv, real, a.batch_size, self.device, a.window, desc="xrv (real)")
        fake_xrv = xrv.features(self.xrv, fake, a.batch_size, self.device, desc="xrv (generated)")
        if min(len(real), len(fake)) < xrv.DIMS:
            warnings.warn(f"FID-XRV: {len(real)} real / {len(fake)} generated images, fewer than the {xrv.DIMS} "
                          f"feature dims; the covariances are singular")
        fid = metrics.frechet_distance(*metrics.activation_statistics(self.real_xrv),
                                       *metrics.activation_statistics(fake_xrv))
        mean, std = metrics.kid(self.real_xrv, fake_xrv, subset, a.kid_subsets)
        return {"fid": fid, "kid": {"mean": mean, "std": std, "dims": xrv.DIMS, "subset_size": subset,
                                    "subsets": a.kid_subsets}}


def mean_std(values):
    """Mean and std (ddof=0); equal values have std 0, also when they are inf (PSNR of identical images)."""
    if all(v == values[0] for v in values):
        return {"mean": float(values[0]), "std": 0.0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def read_prompts(path, n_images):
    try:
        prompts = Path(path).read_text(encoding="utf-8-sig").splitlines()   # a byte order mark is no text
    except (OSError, UnicodeDecodeError) as e:
        raise MinisdError(f"--prompts {path}: cannot read ({e})") from None
    if len(prompts) != n_images:
        raise MinisdError(f"--prompts {path}: {len(prompts)} prompts for {n_images} generated images "
                          f"(want one line per image, in sorted file order)")
    return prompts


def name_pairs(real_files, fake_files, window=None):
    """(real, fake) files with the same name stem, if every fake has one; else None with a warning."""
    by_stem = {f.stem: f for f in real_files}
    pairs = [(by_stem[f.stem], f) for f in fake_files if f.stem in by_stem]
    if len(pairs) < len(fake_files):
        if pairs:
            warnings.warn(f"SSIM/PSNR skipped: only {len(pairs)} of {len(fake_files)} generated files have a real "
                          f"file of the same name")
        return None
    images = [(metrics.load_image(r, window), metrics.load_image(f)) for r, f in pairs]
    for (r, f), (a, b) in zip(pairs, images):
        if a.shape != b.shape:
            warnings.warn(f"SSIM/PSNR skipped: {r} and {f} differ in size")
            return None
    return images


def evaluate_folders(args, device):
    real, fake = metrics.list_images(args.real), metrics.list_images(args.fake)
    prompts = read_prompts(args.prompts, len(fake)) if args.prompts else None
    evaluate = Evaluator(args, device, with_clip=prompts is not None)
    result = evaluate(real, fake, name_pairs(real, fake, args.window), prompts)
    if result["clip_score"]:
        result["clip_score"]["per_image"] = dict(zip((f.name for f in fake), result["clip_score"]["per_image"]))
    n = min(len(real), len(fake), GRID_COLUMNS)
    rows = [[metrics.to_unit(x, args.window) for x in real[:n]], [metrics.to_unit(x) for x in fake[:n]]]
    return {"mode": "folders", "real": str(args.real), "fake": str(args.fake), **result, **evaluate.record()}, rows


def latest_run(runs="runs"):
    """(folder, record) of the newest run that makes images: a --stage vae run trains only a VAE."""
    for path in sorted(Path(runs).glob("*/args.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        record = read_run_record(path.parent, required=("model", "data"))
        if record.get("stage") != "vae":
            return path.parent, record
    raise MinisdError(f"no run in {runs}/ to evaluate: pass --real DIR --fake DIR, or --data NAME "
                      f"[--model M --adapter A], or train one with train.py")


def evaluate_model(args, device):
    from .cxr.model import native_resolution
    from .data import load_dataset, load_manifest
    from .layout import prepare_for_sampling
    from .sampling import ddim_sample
    resolution = args.resolution or native_resolution(args.model) or 224
    data_root = args.data_root or os.path.join("data", args.data)
    if args.manifest:   # the split a run recorded, exactly
        items = list(load_manifest(args.manifest, args.data, data_root, resolution, args.window))
    else:
        items = list(load_dataset(args.data, data_root, split=args.split, resolution=resolution,
                                  seed=args.data_seed, window=args.window, fractions=split_fractions("--split", args.fractions)))
    if not items:
        raise MinisdError(f"--data {args.data} --split {args.split}: no samples in {data_root}")
    prompts = [item["prompt"] for item in items]
    real = [((item["image"].float() + 1) / 2).clamp(0, 1) for item in items]
    evaluate = Evaluator(args, device, with_clip=True)  # weights are checked before the long generation
    sd = load(args.model, device=device, dtype=PRECISIONS[args.precision])
    if args.adapter:
        from .adapters import load_adapter
        load_adapter(sd, args.adapter)
    prepare_for_sampling(sd, device)
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
        atomic_json(manifest, folder / "prompts.json")
        per_seed[str(seed)] = evaluate(real, fake, list(zip(real, fake)), prompts)
        generated.append(fake)
    n = min(len(real), GRID_COLUMNS)
    rows = [real[:n]] + [[metrics.to_unit(x) for x in fake[:n]] for fake in generated]
    numbers = [scalars(r) for r in per_seed.values()]
    summary = {}
    for name in numbers[0]:
        values = [x[name] for x in numbers]
        summary[name] = ({"mean": None, "std": None} if None in values  # a seed's FID at that dim was not computed
                         else {"mean": float(np.mean(values)), "std": float(np.std(values))})  # std with ddof=0
    return {"mode": "model", "model": args.model, "adapter": args.adapter, "data": args.data, "data_root": data_root,
            "split": args.split, "data_seed": args.data_seed, "manifest": args.manifest,
            "ids": [item["id"] for item in items], "resolution": resolution, "seeds": args.seeds,
            "steps": args.steps, "guidance": args.guidance, "summary": summary, "per_seed": per_seed,
            "truncated_prompts": next(iter(per_seed.values())).get("truncated_prompts", 0),
            "images": next(iter(per_seed.values()))["images"], **evaluate.record()}, rows


# ---------------------------------------------------------------------------------------------- report

LABELS = {"clip_score": "CLIP score", "ssim": "SSIM", "psnr": "PSNR (dB)"}


def scalars(result, key="mean"):
    """The headline numbers (or with key="std" their spread) of one result, by table label."""
    out = {f"FID-{d}": v for d, v in result["fid"].items()} if key == "mean" else {}
    out[f"KID ({result['kid']['dims']}-d)"] = result["kid"][key]
    if result.get("xrv"):
        out.update({"FID-XRV": result["xrv"]["fid"]} if key == "mean" else {})
        out["KID (XRV)"] = result["xrv"]["kid"][key]
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
    if report.get("xrv_weights"):
        lines.append(f"XRV: {xrv.FEATURES}; weights sha256 {report['xrv_weights']['sha256'][:16]}….")
    for w in report["warnings"]:
        lines.append(f"- warning: {w}")
    return "\n".join(lines) + "\n"


def save_grid(rows, path, tile=128):
    """Rows of images (real first, then each generated set) as one PNG of tile x tile cells."""
    tiles = torch.cat([F.interpolate(x[None], size=(tile, tile), mode="bilinear", antialias=True, align_corners=False)
                       for row in rows for x in row])
    save_png(grid(tiles, columns=len(rows[0])), path)
