"""train.py's flags for training the chest-X-ray LDM from scratch (--stage vae, then --stage unet --vae RUN):
the paper's settings as defaults, and the checks that catch a wrong order of stages or a VAE of another model
before any work is done."""
import os

from .cli import RUNS, check_finite, read_run_record
from .cxr.config import CONFIGS
from .checkpoint.cxr import vae_config
from .cxr.model import check_vae, native_resolution
from .data import same_studies
from .errors import MinisdError

STAGES = ("vae", "unet")
# The paper: VAE 200 epochs, AdamW 1e-4 cosine, batch 32, L_recon + 1e-4·KL; U-Net 480 epochs, lr 1e-4 → 4.62e-5,
# batch 4 × 4 accumulation, 10% of prompts dropped; both on a 70/10/20 split.
DEFAULTS = {
    "vae": {"epochs": 200, "batch_size": 32, "lr": 1e-4, "lr_end": 0.0, "kl_weight": 1e-4},
    "unet": {"epochs": 480, "batch_size": 4, "grad_accum": 4, "lr": 1e-4, "lr_end": 4.62e-5, "cfg_dropout": 0.1},
}
COMMON = {"split": "70/10/20", "weight_decay": 0.01}
# cxr-tiny is the CPU demo: a run of a few minutes.
TINY = {"max_steps": 80, "val_max": 64}
ADAPTER_FLAGS = ("method", "rank", "alpha", "lam", "expand_every", "max_rank", "fisher_window", "fisher", "preset",
                 "convs", "freeze_text_encoder")
STAGE_FLAGS = ("vae", "text_encoder", "ema", "weight_decay", "lr_end", "kl_weight")   # only with --stage
ONLY = {"vae": ("kl_weight",), "unet": ("vae", "text_encoder")}


def flag(name):
    return "--" + name.replace("_", "-")


def prepare(args, given):
    """Check a new run's stage flags and fill in its stage's defaults (flags given on the command line win);
    without --stage, the run fine-tunes adapters (SeLoRA unless --method says otherwise)."""
    if args.stage is None:
        for name in STAGE_FLAGS:
            if name in given:
                raise MinisdError(f"{flag(name)} is for training the chest-X-ray LDM from scratch (--stage vae or unet)")
        args.method = args.method or "selora"
        record = trained_model_run(args.model)
        for name, value in (split_of_run(args, given, record, args.model) if record else {}).items():
            setattr(args, name, value)
        return
    if args.model not in CONFIGS:
        raise MinisdError(f"--stage {args.stage} trains the chest-X-ray LDM from scratch: --model {' or '.join(CONFIGS)}, "
                          f"not {args.model} (to fine-tune a trained model, leave out --stage)")
    for name in ADAPTER_FLAGS:
        if name in given:
            raise MinisdError(f"{flag(name)} is for fine-tuning with adapters; --stage {args.stage} trains the model's "
                              f"own weights")
    for stage, names in ONLY.items():
        for name in names:
            if name in given and args.stage != stage:
                raise MinisdError(f"{flag(name)} is for --stage {stage}"
                                  + (": train the VAE first (--stage vae), then give its run to --stage unet --vae RUN"
                                     if name == "vae" else ""))
    defaults = {**COMMON, **DEFAULTS[args.stage], "resolution": native_resolution(args.model),
                **(TINY if args.model == "cxr-tiny" else {})}
    if args.stage == "unet":
        if args.vae is None:
            raise MinisdError("--stage unet trains on a trained VAE's latents: give --vae RUN, the run folder of a "
                              "--stage vae run (or a cxr-ldm model folder, or a VAE folder)")
        args.vae, record = find_vae(args.vae)
        defaults.update(from_vae_run(args, given, record))
        check_vae(vae_config(args.vae), CONFIGS[args.model].vae, args.vae)
    for name, value in defaults.items():
        if name not in given:
            setattr(args, name, value)
    args.method = None


def check(args):
    """The stage flags' values (also of a resumed run's record)."""
    for name in ("weight_decay", "lr_end", "kl_weight"):
        if getattr(args, name) is not None:
            check_finite(flag(name), getattr(args, name))
            if getattr(args, name) < 0:
                raise MinisdError(f"{flag(name)} must be 0 or more, got {getattr(args, name)}")
    if args.ema is not None and not 0 < args.ema < 1:
        raise MinisdError(f"--ema is a decay between 0 and 1 (e.g. 0.999), got {args.ema}")


def find_vae(source):
    """--vae: (the VAE folder, the args of the --stage vae run it comes from or None). `source` is a --stage vae run
    (runs/NAME, or NAME), a cxr-ldm model folder (its vae/), or a VAE folder itself."""
    if not os.path.exists(source) and os.path.isdir(os.path.join(RUNS, source)):
        source = os.path.join(RUNS, source)
    if not os.path.isdir(source):
        raise MinisdError(f"--vae {source}: no such folder (give the run folder of a --stage vae run)")
    record = read_run_record(source) if os.path.isfile(os.path.join(source, "args.json")) else None
    if record is not None and record.get("stage") != "vae":
        kind = f"a --stage {record['stage']} run" if record.get("stage") else "a fine-tuning run"
        raise MinisdError(f"--vae {source}: {kind}, not a --stage vae run (train the VAE first with --stage vae)")
    for folder in (os.path.join(source, "vae"), source):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder, record
    if record is not None:
        raise MinisdError(f"--vae {source}: the --stage vae run has no trained VAE yet ({os.path.join(source, 'vae')} "
                          f"is written at its first validation)")
    raise MinisdError(f"--vae {source}: no VAE there (expected {os.path.join(source, 'vae', 'config.json')}: a --stage "
                      f"vae run folder, a cxr-ldm model folder, or a VAE folder)")


def from_vae_run(args, given, record):
    """Defaults the U-Net stage takes from the VAE's run: its resolution and, on the same data, its split."""
    if record is None:
        return {}
    if record.get("model") != args.model:
        raise MinisdError(f"--vae {args.vae}: the VAE of a {record.get('model')} run; this run trains {args.model}")
    taken = {"resolution": record.get("resolution"), **split_of_run(args, given, record, f"the VAE ({args.vae})")}
    return {k: v for k, v in taken.items() if v is not None}


def split_of_run(args, given, record, trained):
    """On the data the run of `record` trained on (or IU X-Ray's other release): its --split and --data-seed, so
    that what it `trained` has seen no image of this run's validation and test splits; another split given is
    refused."""
    same_folder = record.get("data") == args.data and record.get("data_root") == args.data_root
    if not (same_folder or (record.get("data") != args.data and same_studies(record.get("data"), args.data))):
        return {}
    for name in ("data_seed", "split"):
        if name in given and getattr(args, name) != record.get(name):
            raise MinisdError(f"{flag(name)} {getattr(args, name)}: {trained} was trained on the {record.get('data')} split of "
                              f"{flag(name)} {record.get(name)}, which puts some of this split's validation and test "
                              f"images in its training set")
    return {name: record.get(name) for name in ("data_seed", "split")}


def trained_model_run(model):
    """The record of the --stage unet run whose model/ (or model_last/) folder `model` is, or None."""
    folder = os.path.normpath(os.fspath(model))
    record = os.path.join(os.path.dirname(folder), "args.json")
    if os.path.basename(folder) not in ("model", "model_last") or not os.path.isfile(record):
        return None
    record = read_run_record(os.path.dirname(folder))
    return record if record.get("stage") == "unet" else None
