"""Evaluate generated images: FID (Inception dims 64/192/768/2048), KID, CLIP score, SSIM/PSNR, and with
--features xrv FID and KID on chest-X-ray features (torchxrayvision's DenseNet-121).

  python eval.py --real DIR --fake DIR [--prompts FILE]          two image folders
  python eval.py --model M --adapter A --data NAME --data-root D  generate from the test prompts, per seed
  python eval.py --run NAME                                       a run, on the test split it recorded
  python eval.py                                                  the most recent run in runs/

Writes eval.json and eval.md (and grid.png) to --out and prints the Markdown table.
"""
import json
import sys
import warnings
from pathlib import Path

import minisd
from minisd import xrv
from minisd.adapters import read_adapter
from minisd.cli import (PRECISIONS, ArgumentParser, check, check_data_root, check_finite, check_pixels, check_seed,
                        check_steps, check_window, data_seed_of, main_guard, of_type, output_folder, pick_device,
                        read_run_record, run_folder, run_outputs, split_fractions, warn_half_precision_on_cpu)
from minisd.data import DATASETS, same_studies
from minisd.errors import MinisdError
from minisd.files import atomic_text, clear_outputs, json_text
from minisd.evaluation import evaluate_folders, evaluate_model, latest_run, markdown, save_grid
from minisd.inception import DIMS, RESIZE_MODE


def parse_args(argv):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("two folders")
    g.add_argument("--real", help="folder of real images")
    g.add_argument("--fake", help="folder of generated images")
    g.add_argument("--prompts", help="text file, one prompt per line, in the sorted order of the --fake files "
                                     "(adds the CLIP score)")
    g = p.add_argument_group("a model, end to end")
    g.add_argument("--model", help="checkpoint file, diffusers folder, hub id, 'tiny', or a chest-X-ray LDM (its folder, "
                                   f"'cxr-ldm', 'cxr-tiny') (default {minisd.DEFAULT_MODEL})")
    g.add_argument("--adapter", help="adapter .safetensors written by train.py")
    g.add_argument("--run", help="runs/NAME: its model, data and adapter (--model, --adapter, --data-root override), "
                                 "evaluated on its recorded split manifest at its resolution")
    g.add_argument("--data", choices=sorted(DATASETS), help="data set")
    g.add_argument("--data-root", help="data folder (default data/NAME)")
    g.add_argument("--split", default="test", help="split whose prompts and images are used")
    g.add_argument("--data-seed", type=int,
                   help="seed of the data split, train.py's --data-seed (default: the adapter's, else 0)")
    g.add_argument("--resolution", type=int, help="image size (default: the run's, else a chest-X-ray LDM's own, else 224)")
    g.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                   help="linear window for DICOM films, in place of their own VOI LUT or window (default: the run's)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one image set per seed; with N prompts, image k of seed s starts from noise seed s*N+k")
    g.add_argument("--steps", type=int, default=50, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--sample-batch-size", type=int, default=8, help="prompts per sampling batch")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of the diffusion model while sampling")
    g = p.add_argument_group("metrics")
    g.add_argument("--inception-weights", help="pt_inception-2015-12-05-6726825d.pth (default: cache, else download)")
    g.add_argument("--force-inception-weights", action="store_true",
                   help="use --inception-weights whose SHA-256 is not pytorch-fid's (FID not comparable; warned)")
    g.add_argument("--clip-weights", help="open_clip ViT-L-14-quickgelu OpenAI weights (default: cache, else download)")
    g.add_argument("--no-clip", action="store_true", help="no CLIP score (when only the Inception weights are at hand)")
    g.add_argument("--features", choices=["xrv"], help="also FID and KID on torchxrayvision's DenseNet-121 "
                                                       "(densenet121-res224-all) chest-X-ray features")
    g.add_argument("--xrv-weights", help=f"torchxrayvision's {xrv.WEIGHTS_FILE} (or its state dict) "
                                         "(default: cache, else download)")
    g.add_argument("--dims", type=int, nargs="+", choices=DIMS, default=list(DIMS), help="Inception dims for FID")
    g.add_argument("--kid-subset-size", type=int, help="default: min(1000, number of images)")
    g.add_argument("--kid-subsets", type=int, default=100, help="KID subsets drawn")
    g.add_argument("--batch-size", type=int, default=50, help="images per Inception/CLIP batch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--out", help="output folder (default eval/, or runs/NAME/eval for a run)")
    return p.parse_args(argv)


# What an evaluation writes into --out, removed first so that a failed call leaves nothing a later one could
# take for its own (a stale eval.json, or images from other weights in a seed folder).
REPORT_FILES = ("eval.json", "eval.md", "grid.png")
GENERATED_FILES = ("seed*/[0-9][0-9][0-9][0-9]-*.png", "seed*/prompts.json")


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
    args.manifest = args.fractions = None
    if args.run or not (args.model or args.data or args.adapter):
        resolve_run(args)
    elif not args.data:
        raise MinisdError("--model/--adapter need --data NAME for the test prompts and real images")
    else:
        check_data_root(args.data, args.data_root)
        if args.adapter:
            resolve_adapter(args)
    args.model = args.model or minisd.DEFAULT_MODEL
    args.data_seed = args.data_seed or 0
    args.out = args.out or "eval"
    return "model"


def resolve_run(args):
    """--run NAME, or the latest run: its model, data, resolution and adapter, and the manifest of the
    split it recorded (runs made before manifests of every split were kept: the split re-drawn with the
    seed it was drawn with)."""
    for flag in ("data", "data_seed"):
        if getattr(args, flag) is not None:
            raise MinisdError(f"--{flag.replace('_', '-')} with a run: a run is evaluated on the split it recorded "
                              f"(for other data, give --adapter and --data instead)")
    if args.run:
        folder = Path(run_folder("--run", args.run))
        try:
            record = read_run_record(folder, required=("model", "data"))
        except MinisdError as e:
            raise MinisdError(f"--run {args.run}: {e}") from None
    else:
        folder, record = latest_run()
    check_recorded(folder / "args.json", record)
    if record["data"] not in DATASETS:
        raise MinisdError(f"{folder / 'args.json'}: 'data' is {json.dumps(record['data'])}, expected one of "
                          f"{', '.join(sorted(DATASETS))}")
    model, adapter = run_outputs("--run", folder, record)   # the folder named is the run, wherever it was made
    adapter = args.adapter or adapter
    if not Path(adapter or model).exists():
        raise MinisdError(f"{adapter or model}: not found (has the run finished?); pass --adapter PATH")
    args.model, args.data, args.adapter = args.model or model, record["data"], adapter
    args.fractions = record.get("split")
    check_data_root(args.data, args.data_root)
    args.data_root = args.data_root or record.get("data_root")
    args.resolution = args.resolution or record.get("resolution")
    args.window = args.window or record.get("window")
    args.data_seed = data_seed_of(record)
    manifest = folder / f"manifest_{args.split}.jsonl"
    if manifest.is_file():
        args.manifest = str(manifest)
    else:
        print(f"{manifest}: not recorded; the {args.split} split is drawn again with data seed {args.data_seed}",
              file=sys.stderr)
    args.out = args.out or str(folder / "eval")
    print(f"evaluating run {folder}: model {args.model}, data {args.data}, split {args.split}", file=sys.stderr)


def check_recorded(source, record):
    """The resolution, window, data seed and split that a run's args.json or an adapter's metadata gives,
    checked as their flags are."""
    for name in ("resolution", "data_seed", "seed"):
        if record.get(name) is not None and not of_type(record[name], int):
            raise MinisdError(f"{source}: recorded {name} is {json.dumps(record[name])}, expected an integer")
    if record.get("resolution") is not None:
        check_pixels(f"{source}: recorded resolution", record["resolution"])
    for name in ("data_seed", "seed"):
        if record.get(name) is not None:
            check_seed(f"{source}: recorded {name}", record[name])
    window = record.get("window")
    if window is not None:
        if not (isinstance(window, list) and len(window) == 2 and all(of_type(v, float) for v in window)):
            raise MinisdError(f"{source}: recorded window is {json.dumps(window)}, expected [CENTER, WIDTH]")
        check_window(f"{source}: recorded window", window)
    split = record.get("split")
    if split is not None:
        split_fractions(f"{source}: recorded split", split if isinstance(split, str) else json.dumps(split))


def resolve_adapter(args):
    """Adapter mode: the resolution and, on the data it was trained on (or the same studies), the data seed of
    its training arguments (its metadata), and its run's manifest when the adapter lies in its run folder."""
    _, meta = read_adapter(args.adapter)
    trained = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    check_recorded(args.adapter, trained)
    args.resolution = args.resolution or trained.get("resolution")
    args.window = args.window or trained.get("window")
    if not same_studies(trained.get("data"), args.data):
        return
    seed = data_seed_of(trained)
    if args.data_seed is not None and args.data_seed != seed:
        raise MinisdError(f"--data-seed {args.data_seed}: {args.adapter} was trained on the {trained['data']} split "
                          f"of data seed {seed}; another split's {args.split} images include its training images")
    args.data_seed, args.fractions = seed, trained.get("split")
    manifest = Path(args.adapter).parent / f"manifest_{args.split}.jsonl"
    if manifest.is_file() and trained.get("data") == args.data:   # the other release names its files otherwise
        args.manifest = str(manifest)


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
    if args.window is not None:
        check_window("--window", args.window)
    if args.xrv_weights and args.features != "xrv":
        raise MinisdError("--xrv-weights needs --features xrv")
    if args.xrv_weights:
        xrv.weights_path(args.xrv_weights)   # a missing file is named before any work
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
    clear_outputs(out, REPORT_FILES + (GENERATED_FILES if mode == "model" else ()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report, rows = (evaluate_folders if mode == "folders" else evaluate_model)(args, device)
    messages = []  # warnings about the numbers; deprecations are about code
    for w in caught:
        if not issubclass(w.category, DeprecationWarning) and str(w.message) not in messages:
            messages.append(str(w.message))
    report["resize_mode"] = RESIZE_MODE
    report["dicom_window"] = args.window   # None: each film's own VOI LUT or window
    report.setdefault("truncated_prompts", 0)
    report["warnings"] = messages
    table = markdown(report)
    atomic_text(json_text(report), out / "eval.json")
    atomic_text(table, out / "eval.md")
    save_grid(rows, out / "grid.png")
    for m in messages:
        print(f"warning: {m}", file=sys.stderr)
    print(table)
    print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'grid.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
