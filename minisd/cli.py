"""What every script shares: bad input is one `error:` line and exit status 2, never a traceback."""
import argparse
import functools
import json
import math
import os
import re
import sys
import warnings

import torch
from tqdm import tqdm

from .checkpoint.files import read_json
from .errors import MinisdError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RUNS = "runs"
SEED_MAX = 2**32 - 1   # numpy's range; seed * 100003 + epoch (train.py's shuffles) stays within torch's
MAX_STEPS = 1000       # DDIM steps: at most one per training timestep
MAX_PIXELS = 4096      # 8× SD-1.5's own size: far beyond it, one image no longer fits any device's memory


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each flag's help ends with its default, unless it has none or says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        value = action.default
        shown = action.option_strings and value is not None and value is not False and value not in ("", argparse.SUPPRESS)
        if shown and "default" not in text:
            text += f" (default: {' '.join(map(str, value)) if isinstance(value, list) else value})"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a flag it cannot parse reported as the same one `error:` line as any other bad input,
    and defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def main_guard(main):
    # Set when a script is loaded, not when main runs, so that a warnings.catch_warnings(record=True) around
    # main (eval.py's, a test's) still records.
    warnings.showwarning = show_warning

    @functools.wraps(main)
    def run(argv=None):
        warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
        try:
            return main(argv)
        except MinisdError as e:
            print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
            sys.exit(2)
        except OSError as e:   # a file the user named cannot be written or read: disk full, no permission, ...
            print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return run


def show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings go above a progress bar, not through it (tqdm.write clears the bar and redraws it)."""
    tqdm.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"), file=file or sys.stderr)


def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", name)
    if not match:
        raise MinisdError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinisdError(f"--device {name}: CUDA is not available on this machine")
    if match.group(1) and int(match.group(1)) >= torch.cuda.device_count():
        raise MinisdError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def warn_half_precision_on_cpu(precision, device):
    if precision != "fp32" and not device.startswith("cuda"):
        warnings.warn(f"--precision {precision} on the CPU is usually many times slower than fp32; it pays off on a GPU")


# ------------------------------------------------------------------------------------------- flag values

def check(ok, flag, value, what):
    """An error naming the flag and its value unless `ok`."""
    if not ok:
        raise MinisdError(f"{flag} must be {what}, got {value}")


def check_seed(flag, value):
    check(0 <= value <= SEED_MAX, flag, value, f"between 0 and {SEED_MAX}")


def check_finite(flag, value, positive=False):
    check(math.isfinite(value) and (value > 0 or not positive), flag, value,
          "a positive finite number" if positive else "a finite number")


def check_steps(flag, value):
    check(1 <= value <= MAX_STEPS, flag, value, f"between 1 and {MAX_STEPS}")


def check_pixels(flag, value):
    check(8 <= value <= MAX_PIXELS and value % 8 == 0, flag, value, f"a positive multiple of 8, at most {MAX_PIXELS}")


def check_window(flag, window):
    """A DICOM linear window: a finite centre and a width of at least 1 (PS3.3 C.11.2.1.2.1)."""
    center, width = window
    check(math.isfinite(center) and math.isfinite(width) and width >= 1, flag, f"{center:g} {width:g}",
          "CENTER WIDTH, finite, with WIDTH at least 1")


def split_fractions(flag, text):
    """"70/10/20" -> {"train": 0.7, "val": 0.1, "test": 0.2}; "80/20" -> train and test only; None -> None (the
    data set's own split)."""
    if text is None:
        return None
    try:
        numbers = [float(x) for x in text.split("/")]
    except ValueError:
        numbers = []
    if len(numbers) not in (2, 3) or not all(math.isfinite(x) and x > 0 for x in numbers) or abs(sum(numbers) - 100) > 1e-6:
        raise MinisdError(f"{flag} {text}: expected train/val/test (or train/test) percentages that sum to 100, "
                          f"e.g. 70/10/20")
    names = ("train", "val", "test") if len(numbers) == 3 else ("train", "test")
    return {name: x / 100 for name, x in zip(names, numbers)}


def check_data_root(data, root):
    """--data-root with the built-in phantom would be ignored: the user surely meant another --data."""
    if data == "phantom" and root is not None:
        raise MinisdError(f"--data-root {root}: the phantom data set is built in and reads no folder "
                          f"(for files, give --data iuxray, montgomery or folder)")


# ------------------------------------------------------------------------------------------- files

def output_folder(flag, path):
    """Make the folder `path` (and its parents) before any work is done, or say why it cannot be."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise MinisdError(f"{flag} {path}: is a file, expected a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise MinisdError(f"{flag} {path}: cannot make the folder ({e.strerror})") from None
    return path


def run_name(flag, text):
    """NAME from NAME or runs/NAME (as tab completion writes it, with or without ./ and a trailing slash):
    a run is named by its folder name under runs/, never by a path that could leave it."""
    name = re.sub(rf"^(\./)*{RUNS}/+", "", text.replace(os.altsep or os.sep, os.sep)).rstrip(os.sep) if text else text
    if not name or name in (".", "..") or os.sep in name:
        raise MinisdError(f"{flag} {text!r}: a run name is one folder name under {RUNS}/, not a path")
    return name


def run_folder(flag, text):
    """runs/NAME for a run named NAME or runs/NAME."""
    return os.path.join(RUNS, run_name(flag, text))


def read_run_record(folder, required=(), parser=None):
    """A run's args.json as a dict, with the `required` keys present and, given the `parser` that made it,
    each value of the type its flag parses to."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise MinisdError(f"{folder}: is a file, not a run folder")
    path = os.path.join(folder, "args.json")
    record = read_json(path, "train.py records every run's arguments there")
    missing = [key for key in required if key not in record]
    if missing:
        raise MinisdError(f"{path}: {', '.join(map(repr, missing))} not recorded")
    for action in parser._actions if parser else ():
        if action.dest in record:
            check_recorded_type(path, action, record[action.dest])
    return record


def run_outputs(flag, folder, record):
    """(model, adapter) of a run: a fine-tuning run's base model and adapter.safetensors, or the model folder a
    --stage unet run trained (no adapter)."""
    path = os.path.join(folder, "args.json")
    if not isinstance(record.get("model"), str):
        raise MinisdError(f"{path}: 'model' is {json.dumps(record.get('model'))}, expected a string")
    if record.get("stage") not in (None, "vae", "unet"):   # stage_args.STAGES
        raise MinisdError(f"{path}: 'stage' is {json.dumps(record['stage'])}, expected null, vae or unet")
    if record.get("stage") == "vae":
        raise MinisdError(f"{flag} {folder}: a --stage vae run trains only the VAE; give the --stage unet run trained on it")
    if record.get("stage"):
        return os.path.join(folder, "model"), None
    return record["model"], os.path.join(folder, "adapter.safetensors")


def data_seed_of(record):
    """The seed of the data split of a run's recorded arguments; runs made before --data-seed existed drew
    their split with --seed."""
    return record.get("data_seed", record.get("seed", 0))


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def of_type(value, expected):
    """isinstance, where bool is no int and an int is a float (JSON writes 1.0 as 1 from some tools)."""
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if expected is float else expected)


def check_recorded_type(path, action, value):
    """An error naming the field unless `value` is what `action`'s flag parses to (or its None default)."""
    if value is None and action.default is None:
        return
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        expected = bool
    else:
        expected = action.type if action.type in TYPE_NAMES else str
    values = value if action.nargs in ("+", "*") and isinstance(value, list) else [value]
    for v in values:
        if not of_type(v, expected):
            raise MinisdError(f"{path}: {action.dest!r} is {json.dumps(value)}, expected {TYPE_NAMES[expected]}")
        if action.choices is not None and v not in action.choices:
            raise MinisdError(f"{path}: {action.dest!r} is {json.dumps(value)}, expected one of "
                              f"{', '.join(map(str, action.choices))}")
