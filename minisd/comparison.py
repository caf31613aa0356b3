"""The paper's comparison grid: adapters (LoRA, DyLoRA, AdaLoRA, and SeLoRA at each λ) × training seeds ×
data sets, each cell trained by train.py and evaluated by eval.py in a child process, then tabulated.

A cell is the run folder runs/<grid>-<data>-<method>[-lambda<λ>]-seed<seed>, and what it holds says what is
left to do: a finished summary.json (trained), a checkpoint (continued with --resume), eval/eval.json made
with the grid's evaluation settings and weights after the adapter was written (evaluated). So the same
command given again skips finished cells and continues an interrupted one from its last checkpoint.
Child processes give each cell its own peak memory (a process's peak resident set only grows) and keep
a crash inside one cell from the others: a failed cell is reported with its error line and log, the grid
goes on, the tables are written with what finished, and the command ends with an error naming the
failed cells (given again, it retries them).
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from . import inception, metrics
from .cli import RUNS
from .errors import MinisdError
from .files import atomic_json

COMPARISONS = "comparisons"
LABELS = {"lora": "LoRA", "dylora": "DyLoRA", "adalora": "AdaLoRA", "selora": "SeLoRA"}
# Flags of the cells' train.py and eval.py runs that --quick sets unless given: a handful of steps at 64 px, in
# which SeLoRA still tests its ranks four times, and one image set of 10 DDIM steps per cell, with FID at 64
# dims only (a small test split has fewer images than 192 or 2048 dims: their covariances are singular).
QUICK_TRAIN = {"max_steps": 40, "expand_every": 10, "resolution": 64, "batch_size": 4, "val_max": 8,
               "val_images": 2, "val_steps": 10}
QUICK_EVAL = {"seeds": [0], "steps": 10, "dims": [64]}


@dataclass
class Grid:
    """What a comparison runs: `train` and `evaluation` hold train.py's and eval.py's flags by their
    argparse names (max_steps, seeds, ...), given to every cell."""
    name: str
    model: str
    data: dict                   # data set -> its --data-root (None: the default)
    methods: list
    lambdas: list
    train_seeds: list
    train: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    device: str = "auto"

    @property
    def folder(self):
        return os.path.join(COMPARISONS, self.name)


@dataclass(frozen=True)
class Cell:
    data: str
    method: str
    lam: float | None
    seed: int
    name: str

    @property
    def folder(self):
        return os.path.join(RUNS, self.name)

    def file(self, *parts):
        return os.path.join(self.folder, *parts)

    @property
    def label(self):
        return f"{LABELS[self.method]} λ {self.lam:g}" if self.lam is not None else LABELS[self.method]


def cells(grid):
    """The grid's cells: per data set, per method (SeLoRA once per λ), per training seed."""
    out = []
    for data in grid.data:
        for method in grid.methods:
            for lam in grid.lambdas if method == "selora" else [None]:
                for seed in grid.train_seeds:
                    tag = f"-lambda{lam}" if lam is not None else ""
                    out.append(Cell(data, method, lam, seed, f"{grid.name}-{data}-{method}{tag}-seed{seed}"))
    return out


def flag_argv(values):
    """{argparse name: value} -> command-line flags; lists become several values, True a bare flag."""
    argv = []
    for name, value in values.items():
        flag = "--lambda" if name == "lam" else "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return argv


def read_record(path):
    """A JSON object from a file, or None when it is absent or unreadable (the step that writes it runs again)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


# ------------------------------------------------------------------------------------- a cell's state

def cell_train_args(grid, cell):
    """train.py's arguments of a cell as its args.json records them."""
    values = {"model": grid.model, "data": cell.data, "method": cell.method, "seed": cell.seed, **grid.train}
    if cell.lam is not None:
        values["lam"] = cell.lam
    if grid.data[cell.data] is not None:
        values["data_root"] = grid.data[cell.data]
    return values


def foreign_run(grid, cell):
    """Why the cell's folder holds another run than the cell's (a differing recorded argument), or None."""
    record = read_record(cell.file("args.json"))
    if record is None:
        return None
    for key, value in cell_train_args(grid, cell).items():
        if key in record and record[key] != value:
            flag = "--lambda" if key == "lam" else "--" + key.replace("_", "-")
            return f"{cell.folder} holds a run with {flag} {record[key]}, not {value}; move it away or give another --name"
    return None


def trained(cell):
    summary = read_record(cell.file("summary.json"))
    return bool(summary and summary.get("finished")) and os.path.exists(cell.file("adapter.safetensors"))


def evaluation_of(grid, cell, weights):
    """The cell's eval.json when it was made after its adapter with the grid's settings and these weights."""
    report = read_record(cell.file("eval", "eval.json"))
    if report is None or weights["inception"] is None:
        return None
    per_seed = report.get("per_seed") or {}
    e = grid.evaluation
    try:
        current = (os.path.getmtime(cell.file("eval", "eval.json")) >= os.path.getmtime(cell.file("adapter.safetensors"))
                   and report.get("seeds") == e["seeds"] and report.get("steps") == e["steps"]
                   and report.get("guidance") == e["guidance"]
                   and report["inception_weights"]["sha256"] == weights["inception_sha256"]
                   and all(str(d) in r["fid"] for r in per_seed.values() for d in e["dims"])
                   and (weights["clip"] is None or (all(r.get("clip_score") for r in per_seed.values())
                                                    and report["clip_weights"]["sha256"] == weights["clip_sha256"])))
    except (OSError, KeyError, TypeError, AttributeError):   # a damaged eval.json: evaluated again
        return None
    return report if current and per_seed else None


# ------------------------------------------------------------------------------------- metric weights

def cached_clip_weights(cache):
    """open_clip's OpenAI weights of CLIP_MODEL where eval.py's download puts them, or None."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    repo = (open_clip.get_pretrained_cfg(metrics.CLIP_MODEL, "openai").get("hf_hub") or "").rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin") if repo else ():
        hit = try_to_load_from_cache(repo, filename, cache_dir=cache)
        if isinstance(hit, str):
            return hit
    return None


def download_clip_weights(cache):
    """open_clip's OpenAI weights of CLIP_MODEL downloaded into `cache` (quietly), or None."""
    import open_clip
    from huggingface_hub.utils import logging as hub_logging
    verbosity = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()   # offline, every retry would print a line
    try:
        return open_clip.download_pretrained(open_clip.get_pretrained_cfg(metrics.CLIP_MODEL, "openai"), cache_dir=cache) or None
    except Exception:   # no network, no such file on the hub, ...: the column says what it needs
        return None
    finally:
        hub_logging.set_verbosity(verbosity)


def metric_weights(inception_weights=None, clip_weights=None, clip=True, force_inception_weights=False):
    """The FID-Inception and CLIP weight files every evaluation of the grid uses, with their SHA-256: given (a
    missing or foreign file is an error, and Inception weights not pytorch-fid's unless forced), else cached,
    else downloaded (CLIP's only if `clip`); one that cannot be had is None, and "missing" says what the empty
    columns need and how to pass it."""
    weights = {"inception": None, "inception_sha256": None, "clip": None, "clip_sha256": None, "missing": None,
               "force_inception_weights": force_inception_weights}
    if inception_weights is not None:
        weights["inception"] = str(inception.weights_path(inception_weights))
    else:
        try:
            weights["inception"] = str(inception.weights_path())
        except MinisdError:   # neither cached nor downloadable: no evaluation, so no CLIP download either
            pass
    if weights["inception"] is not None:   # a foreign file fails here, not in every cell
        weights["inception_sha256"] = inception.sha256_file(weights["inception"])
        inception.verify_weights(weights["inception"], weights["inception_sha256"], force_inception_weights)
        inception.load_inception(weights["inception"])
    clip_cache = str(inception.cache_dir() / "open_clip")
    if clip_weights is not None:
        if not os.path.isfile(clip_weights):
            raise MinisdError(f"--clip-weights {clip_weights}: no such file (want open_clip {metrics.CLIP_MODEL} "
                              f"OpenAI weights, e.g. open_clip_model.safetensors from {metrics.CLIP_WEIGHTS_URL})")
        weights["clip"] = str(clip_weights)
    elif weights["inception"] is not None and clip:   # without Inception weights no cell is evaluated
        weights["clip"] = cached_clip_weights(clip_cache)
        if weights["clip"] is None:
            print(f"CLIP weights: {metrics.CLIP_MODEL} OpenAI weights are not in {clip_cache}; downloading them "
                  f"(about 1.7 GB; offline this takes a minute to fail)", file=sys.stderr, flush=True)
            weights["clip"] = download_clip_weights(clip_cache)
    if weights["clip"] is not None:
        weights["clip_sha256"] = inception.sha256_file(weights["clip"])
    needs = []
    if weights["inception"] is None:
        needs.append(f"the FID columns need the FID-Inception weights {inception.WEIGHTS_FILE} "
                     f"({inception.WEIGHTS_URL}): pass --inception-weights PATH or put the file in {inception.cache_dir()}")
    if weights["clip"] is None and not clip:
        needs.append(f"--quick leaves out the CLIP-score column (open_clip's {metrics.CLIP_MODEL} takes seconds per "
                     f"image on a CPU core): pass --clip-weights PATH to have it")
    elif weights["clip"] is None:
        needs.append(f"the CLIP-score column needs open_clip's {metrics.CLIP_MODEL} OpenAI weights "
                     f"(open_clip_model.safetensors from {metrics.CLIP_WEIGHTS_URL}): pass --clip-weights PATH")
    if needs:
        evaluated = "no cell is evaluated" if weights["inception"] is None else "cells are evaluated without CLIP score"
        weights["missing"] = (f"{'; '.join(needs)}. Until then {evaluated} and the tables hold what training "
                              f"measured; the same command with the weights evaluates the trained cells without "
                              f"training them again.")
    return weights


# ------------------------------------------------------------------------------------- child processes

class Stopped(Exception):
    """The grid was stopped by signal `signum` while a cell ran; the cell's own process saved what it could."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_script(script, argv, log_path):
    """Run a top-level script in a child process with its output appended to `log_path`; returns its exit
    status. Ctrl-C reaches the child with the terminal's process group and SIGTERM is passed on to it: either
    way the child is waited for, so that it can save a checkpoint, and Stopped is raised."""
    stop = []
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join([sys.executable, script, *argv])}\n")
        log.flush()
        child = subprocess.Popen([sys.executable, script, *argv], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)

        def pass_on(signum, frame):
            stop.append(signum)
            child.send_signal(signum)
        main_thread = threading.current_thread() is threading.main_thread()   # where signal handlers can be set
        previous = signal.signal(signal.SIGTERM, pass_on) if main_thread else None
        try:
            status = child.wait()
        except KeyboardInterrupt:
            stop.append(signal.SIGINT)
            status = child.wait()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
    if stop:
        raise Stopped(stop[0])
    return status


def error_line(log_path):
    """The child's `error:` line, else the last line it wrote (a traceback's last line)."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines()[-200:] if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else (lines[-1] if lines else "no output")


# ------------------------------------------------------------------------------------- the grid

def check_settings(grid):
    """A grid's training settings are fixed by its first run, so that its cells are comparable: given again
    with other settings, the command is refused (more or fewer methods, λ values, seeds, data sets and other
    evaluation settings are fine: new cells are trained, cells are evaluated again)."""
    path = os.path.join(grid.folder, "grid.json")
    recorded = read_record(path)
    if recorded is None:
        return
    for key in ("train", "data"):
        if not isinstance(recorded.get(key), dict):
            raise MinisdError(f"{path}: {key!r} is not an object (the file is damaged: move it away, and the cells' "
                              f"own records are checked again)")

    def flags(record):
        return {"--model": record.get("model"),
                **{"--" + k.replace("_", "-"): v for k, v in record["train"].items()}}
    before, now = flags(recorded), flags(asdict(grid))
    for flag in sorted(before.keys() | now.keys()):
        if before.get(flag) != now.get(flag):
            raise MinisdError(f"{path}: this grid's cells were trained with {flag} {before.get(flag, '(not given)')}, "
                              f"not {now.get(flag, '(not given)')}: give the same training flags to continue it, "
                              f"or a new --name")
    roots = recorded["data"]
    for data in grid.data.keys() & roots.keys():
        if roots[data] != grid.data[data]:
            raise MinisdError(f"{path}: this grid's {data} cells were trained on --data-root {roots[data]}, not "
                              f"{grid.data[data]}: give the same folder to continue it, or a new --name")


def duration(seconds):
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


class Runner:
    """Runs the cells of a grid in order with `run` (default run_script, or a stand-in with its signature),
    saying what it does on `out` (default stdout)."""

    def __init__(self, grid, scripts, weights, run=None, out=None):
        self.grid, self.weights, self.run, self.out = grid, weights, run or run_script, out or sys.stdout
        self.scripts = {name: os.path.join(scripts, f"{name}.py") for name in ("train", "eval")}
        self.logs = os.path.join(grid.folder, "logs")
        self.failures = {}

    def say(self, text):
        print(text, file=self.out, flush=True)

    def step(self, cell, what, argv, tag):
        """Run one script for a cell; False (and the failure recorded) when it fails."""
        log = os.path.join(self.logs, f"{cell.name}.{what}.log")
        self.say(f"{tag} {what} ({log})")
        start = time.perf_counter()
        status = self.run(self.scripts[what], argv, log)
        if status == 0:
            self.say(f"{tag} {what}: done in {duration(time.perf_counter() - start)}")
            return True
        self.failures[cell] = f"{what} failed (exit status {status}): {error_line(log)} — {log}"
        self.say(f"{tag} {self.failures[cell]}")
        return False

    def train(self, cell, tag):
        if trained(cell):
            return True
        problem = foreign_run(self.grid, cell)
        if problem:
            self.failures[cell] = problem
            self.say(f"{tag} {problem}")
            return False
        if os.path.exists(cell.file("checkpoint.pt")):
            argv = ["--resume", cell.name, "--device", self.grid.device]
        else:
            argv = flag_argv({**cell_train_args(self.grid, cell), "run_name": cell.name, "device": self.grid.device})
        return self.step(cell, "train", argv, tag)

    def evaluate(self, cell, tag):
        w = self.weights
        if w["inception"] is None or evaluation_of(self.grid, cell, w) is not None:
            return
        argv = ["--run", cell.name, "--out", cell.file("eval"), "--device", self.grid.device,
                "--inception-weights", w["inception"], *flag_argv(self.grid.evaluation)]
        argv += ["--force-inception-weights"] if w["force_inception_weights"] else []
        argv += ["--clip-weights", w["clip"]] if w["clip"] else ["--no-clip"]
        self.step(cell, "eval", argv, tag)

    def __call__(self, cells):
        os.makedirs(self.logs, exist_ok=True)
        atomic_json(asdict(self.grid), os.path.join(self.grid.folder, "grid.json"))
        for i, cell in enumerate(cells, 1):
            tag = f"[{i}/{len(cells)}] {cell.folder}:"
            try:
                if self.train(cell, tag):
                    self.evaluate(cell, tag)
            except (Stopped, KeyboardInterrupt) as e:
                signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
                self.say(f"{tag} stopped ({signal.Signals(signum).name}); give the same command again to continue: "
                         f"what is finished is kept and this cell continues from its last checkpoint (an evaluation "
                         f"starts over)")
                raise SystemExit(128 + signum) from None
        return self.failures


def check_data(grid):
    """Each data set's folder and layout, read before the first cell: a wrong --data-root is one error line,
    not a failure in every cell."""
    from .data import load_dataset
    for name, root in grid.data.items():
        if name != "phantom":
            load_dataset(name, root, "train", grid.train.get("resolution") or 224, grid.train.get("data_seed", 0))


def run_grid(grid, scripts, weights, run=None, out=None):
    """Train and evaluate every cell not yet done; returns {cell: its failure} for those that failed."""
    check_settings(grid)
    os.makedirs(grid.folder, exist_ok=True)
    return Runner(grid, scripts, weights, run, out)(cells(grid))
