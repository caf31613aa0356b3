"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) during training: the step in progress finishes, the run
checkpoints and says how to resume; a second signal stops at once."""
import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at `step` on signal `signum` after saving a checkpoint; exit status 128 + signum."""

    def __init__(self, signum, step):
        super().__init__(f"interrupted at step {step}")
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum


class StopRequests:
    """A context in which SIGINT/SIGTERM only ask the loop to stop (`requested()`)."""

    def __init__(self):
        self.signum, self.saved = None, {}

    def __enter__(self):
        for signum in SIGNALS:
            self.saved[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, world=1, device="cpu"):
        """The signal to stop on, or None; with several processes, any one's signal stops them all at the
        same step (a process that was not signalled stops on SIGTERM)."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def ignore_stop_signals(worker_id=None):
    """Data-loading workers leave SIGINT/SIGTERM to the main process, which stops them when it is done."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
