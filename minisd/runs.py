"""A run's folder: its arguments, manifests, JSONL log, checkpoints, adapters and plots.

The folder named is the run: a copied or renamed folder continues itself. While a process trains in it
the folder is locked (a second process gets one line naming the first); temporary files of interrupted
writes are removed when it is taken; a torn last log line (power loss, full disk) is dropped on resume;
a run that stopped before its first checkpoint starts again from step 0, clean.
"""
import json
import os
import shutil
import socket
import warnings

import torch

from .errors import MinisdError
from .files import atomic_json, atomic_write, json_text, remove_temporary_files, write_error
from .images import captioned_grid, save_png

try:
    import fcntl
except ImportError:   # Windows: no advisory locks, so runs are not locked there
    fcntl = None

LOCK = ".lock"
# What a run writes; a restart of a run that never reached a checkpoint clears these.
OUTPUTS = ("args.json", "log.jsonl", "manifest_*.jsonl", "adapter*.safetensors", "ranks_*.png", "loss.png",
           "samples/*.png", "tensorboard", "vae", "vae_last", "model", "model_last")
# What a resumed run may change: where it runs, for how long, what it logs and whether it caches latents,
# not what a step computes.
PLACE_ARGS = ("run_name", "adapter", "device", "workers", "max_steps", "epochs", "tensorboard", "cache_latents",
              "cache_latents_to_disk")
TENSORBOARD_SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "total_rank": "train/total_rank",
                       "images_per_s": "train/images_per_s"}


class Run:
    """The run folder: args, manifests, JSONL log, checkpoints, adapters, plots. Only process 0 writes.

    An existing folder is taken (locked) at once; a new one only when the first file is written, so that a
    start that fails before (a bad model path, no data) leaves no empty folder behind."""

    def __init__(self, path, writer, resume=False, tensorboard=False):
        self.path, self.writer, self.resume = path, writer, resume
        self.log_file = self.lock_file = self.tensorboard = None
        self.records = []   # log.jsonl's records as read back, kept so that plotting needs no re-read
        self.summary_writer = tensorboard_writer() if writer and tensorboard else None   # checked before any work
        if writer and os.path.isdir(path):
            self.take()

    def file(self, name):
        return os.path.join(self.path, name)

    def take(self):
        """Make and lock the folder for this process; a new run may not go into one holding a checkpoint."""
        if self.lock_file is not None:
            return
        try:
            os.makedirs(os.path.join(self.path, "samples"), exist_ok=True)
            self.lock_file = lock(self.file(LOCK), self.path)
        except OSError as e:
            raise write_error(self.path, e) from None
        if not self.resume and os.path.exists(self.file("checkpoint.pt")):
            name = os.path.basename(self.path)
            raise MinisdError(f"{self.path} already holds a run: continue it with --resume {name} or pick another --run-name")
        removed = remove_temporary_files(self.path)
        if removed:
            print(f"{self.path}: removed {removed} temporary file(s) of an interrupted write")

    def start_clean(self):
        """A new run in a folder that an earlier start left without a checkpoint: clear what that start wrote."""
        import glob
        stale = [p for pattern in OUTPUTS for p in glob.glob(os.path.join(glob.escape(self.path), pattern))]
        if stale:
            print(f"{self.path}: an earlier start stopped before its first checkpoint; starting again from step 0")
        for path in stale:
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)

    def open_log(self, keep_until_step=None):
        """Append to log.jsonl; on resume, drop what was logged after the checkpoint being resumed, and
        any line a crash left torn."""
        if not self.writer:
            return
        self.take()
        path = self.file("log.jsonl")
        if keep_until_step is None:
            self.start_clean()
        elif os.path.exists(path):
            records = read_log(path)
            self.records = [r for r in records if r.get("step", 0) <= keep_until_step]
            atomic_write(path, lambda tmp: write_lines(tmp, self.records))
        try:
            self.log_file = open(path, "a")
        except OSError as e:
            raise write_error(path, e) from None
        if self.summary_writer is not None:   # events after the checkpoint are dropped, as the log's are
            self.tensorboard = self.summary_writer(self.file("tensorboard"), purge_step=(keep_until_step or 0) + 1)

    def log(self, record):
        if self.log_file:
            line = json_text(record, indent=None)
            try:
                self.log_file.write(line)
                self.log_file.flush()
            except OSError as e:
                raise write_error(self.log_file.name, e) from None
            if is_record(record):
                self.records.append(json.loads(line))   # as read_log would read it: non-finite values null
        if self.tensorboard is not None and "step" in record:
            for key, tag in TENSORBOARD_SCALARS.items():
                if isinstance(record.get(key), (int, float)):
                    self.tensorboard.add_scalar(tag, record[key], record["step"])

    def save_samples(self, images, prompts, step, columns=None):
        """The validation sample grid, captioned with its prompts: samples/stepNNNNNN.png (and TensorBoard)."""
        if not self.writer:
            return
        image = captioned_grid(images, prompts, columns)
        save_png(image, self.file(os.path.join("samples", f"step{step:06d}.png")))
        if self.tensorboard is not None:
            self.tensorboard.add_image("samples", image, step)

    def log_ranks(self, ranks, step):
        if self.tensorboard is not None:
            if ranks:
                self.tensorboard.add_histogram("ranks", torch.tensor(list(ranks.values())), step)
            self.tensorboard.flush()

    def save_json(self, name, payload):
        if self.writer:
            self.take()
            atomic_json(payload, self.file(name))

    def close(self):
        for f in (self.log_file, self.tensorboard, self.lock_file):
            if f is not None:
                f.close()
        self.log_file = self.tensorboard = self.lock_file = None


def tensorboard_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MinisdError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def lock(path, folder):
    """An exclusive lock on `path` held as long as the returned file stays open; an error naming the
    holder when another process has it."""
    f = open(path, "a+")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise MinisdError(f"{folder} is in use: {holder} is training in it (wait for it to end, or pick another "
                          f"--run-name)") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def read_log(path):
    """The records of a log.jsonl: JSON objects with a step number. Other lines are dropped with a warning: a
    torn last line (the run was stopped while writing it), or damage that the warning names by line."""
    records, dropped, number = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if is_record(record):
                records.append(record)
            elif line.strip():
                dropped.append(number)
    if dropped == [number]:
        warnings.warn(f"{path}: dropped 1 torn line(s) (the run was stopped while writing it)")
    elif dropped:
        lines = ", ".join(map(str, dropped[:5])) + (", ..." if len(dropped) > 5 else "")
        warnings.warn(f"{path}: dropped {len(dropped)} damaged line(s) that are not log records (line {lines})")
    return records


def is_record(value):
    """A log record: a JSON object with a step number."""
    return isinstance(value, dict) and isinstance(value.get("step"), int) and not isinstance(value["step"], bool)


def write_lines(path, records):
    with open(path, "w") as f:
        f.writelines(json_text(r, indent=None) for r in records)


def atomic_torch_save(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def check_recorded_args(saved, args, args_path, checkpoint_path):
    """args.json must hold the arguments the checkpoint was trained with (but where and how long it runs)."""
    for key, value in saved.items():
        if key not in PLACE_ARGS and key in vars(args) and getattr(args, key) != value:
            raise MinisdError(f"{args_path}: {key} is {getattr(args, key)!r}, but {checkpoint_path} was trained with "
                              f"{value!r} (put the recorded value back to continue this run)")
