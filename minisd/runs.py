"""A run's folder: its arguments, manifests, JSONL log, checkpoints, adapters and plots."""
import json
import os

import torch


class Run:
    """The run folder: args, manifests, JSONL log, checkpoints, adapters, plots. Only process 0 writes."""

    def __init__(self, path, writer):
        self.path, self.writer = path, writer
        if writer:
            os.makedirs(os.path.join(path, "samples"), exist_ok=True)
        self.log_file = None

    def file(self, name):
        return os.path.join(self.path, name)

    def open_log(self, keep_until_step=None):
        """Append to log.jsonl; on resume, drop what was logged after the checkpoint being resumed."""
        if not self.writer:
            return
        path = self.file("log.jsonl")
        if keep_until_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= keep_until_step]
            with open(path, "w") as f:
                f.writelines(kept)
        self.log_file = open(path, "a")

    def log(self, record):
        if self.log_file:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def save_json(self, name, payload):
        if self.writer:
            tmp = self.file(name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2)
            os.replace(tmp, self.file(name))


def atomic_torch_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
