"""Adapter files in other tools: export to kohya / diffusers, fold into a checkpoint, merge several, inspect.

  python adapter.py export ADAPTER --format kohya --out lora.safetensors   # AUTOMATIC1111, ComfyUI, kohya, diffusers
  python adapter.py export ADAPTER --format diffusers --out FOLDER         # pipe.load_lora_weights(FOLDER)
  python adapter.py fold --model M --adapter ADAPTER --out model.safetensors [--dtype fp16]
  python adapter.py merge A1 A2 ... --out merged.safetensors [--weights 0.7 0.3] [--energy 0.9 | --rank 8]
  python adapter.py info ADAPTER
"""
import argparse
import collections

import torch

import minisd
from minisd.checkpoint.names import PREFIXES
from minisd.cli import ArgumentParser, main_guard
from minisd.errors import MinisdError
from minisd.export import export_diffusers, export_kohya, fold, read_pairs
from minisd.medlego import merge_adapters, summary

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    c = commands.add_parser("export", help="write an adapter in kohya or diffusers format")
    c.add_argument("adapter", help="adapter .safetensors written by train.py or adapter.py merge")
    c.add_argument("--format", required=True, choices=["kohya", "diffusers"])
    c.add_argument("--out", required=True, help="kohya: a .safetensors file; diffusers: a folder (or a .safetensors file)")

    c = commands.add_parser("fold", help="fold an adapter into the base weights and save a single-file checkpoint")
    c.add_argument("--model", default=minisd.DEFAULT_MODEL, help="single .safetensors/.ckpt file, diffusers folder, hub id, or 'tiny'")
    c.add_argument("--adapter", required=True)
    c.add_argument("--out", required=True, help="the checkpoint, .safetensors in the original SD-1.5 layout")
    c.add_argument("--dtype", choices=DTYPES, default="fp32", help="of the saved weights (the fold itself is fp32)")

    c = commands.add_parser("merge", help="merge adapters into one LoRA by a truncated SVD of their weighted sum")
    c.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter .safetensors files")
    c.add_argument("--out", required=True, help="the merged adapter .safetensors")
    c.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1/N each)")
    c.add_argument("--energy", type=float, help="keep the fewest ranks per layer holding this fraction of Σσ² (default 1: exact)")
    c.add_argument("--rank", type=int, help="keep this many ranks per layer instead")

    c = commands.add_parser("info", help="method, layers, ranks and metadata of an adapter file")
    c.add_argument("adapter")
    return p.parse_args(argv)


def require_safetensors(path, flag="--out"):
    if not str(path).endswith(".safetensors"):
        raise MinisdError(f"{flag} {path}: expected a .safetensors file name")


def info(path):
    pairs, meta = read_pairs(path)
    ranks = {name: A.shape[0] for name, (A, _) in pairs.items()}
    per_part = collections.Counter()
    for name in ranks:
        per_part["U-Net" if name.startswith(PREFIXES["unet"]) else "text encoder"] += 1
    parts = ", ".join(f"{part} {n}" for part, n in per_part.items())
    lines = [f"{path}: {meta['method']} adapter, {len(ranks)} layers ({parts})",
             f"rank: total {sum(ranks.values())}, min {min(ranks.values())}, max {max(ranks.values())}",
             f"alpha {meta['alpha']:g}, scale {meta['scale']:g}, base model fingerprint {meta['fingerprint'][:16]}"]
    if meta.get("args"):
        lines.append("training: " + ", ".join(f"{k}={v}" for k, v in meta["args"].items()))
    if meta.get("rank_history"):
        lines.append(f"rank history: {len(meta['rank_history'])} growth events")
    if meta.get("merge"):
        record = meta["merge"]
        sources = ", ".join(f"{s['path']} ({s['method']}) x {w:g}" for s, w in zip(record["sources"], record["weights"]))
        keep = f"energy {record['energy']}" if record["energy"] is not None else f"rank {record['rank']}"
        lines.append(f"merge of {sources}; kept {keep}")
    return "\n".join(lines)


@main_guard
def main(argv=None):
    args = parse_args(argv)
    if args.command == "export":
        if args.format == "kohya":
            require_safetensors(args.out)
            print(f"wrote {export_kohya(args.adapter, args.out)}")
        else:
            print(f"wrote {export_diffusers(args.adapter, args.out)}")
    elif args.command == "fold":
        require_safetensors(args.out)
        sd = minisd.load(args.model, dtype=torch.float32)
        fold(sd, args.adapter, args.out, DTYPES[args.dtype])
        print(f"wrote {args.out} ({args.dtype})")
    elif args.command == "merge":
        require_safetensors(args.out)
        report = merge_adapters(args.adapters, args.out, weights=args.weights, energy=args.energy, rank=args.rank)
        print(summary(report))
        print(f"wrote {args.out}")
    else:
        print(info(args.adapter))


if __name__ == "__main__":
    main()
