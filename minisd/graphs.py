"""CUDA graphs: a step captured once and replayed, so that its thousands of kernel launches cost one.

At 224 px an SD-1.5 training step is a few milliseconds of GPU work behind a few thousand kernel launches
(hundreds more with an adapter on every linear layer); launched one by one from Python, the GPU waits on the
CPU. `Replayer(fn)` runs `fn` eagerly and, once a call with the same `key` has run eagerly (the warm-up that
creates optimizer state, builds kernels and picks algorithms), captures it into a torch.cuda.CUDAGraph and
replays that for as long as the key stays the same.

A captured function reads and writes only tensors whose storage stays put between calls: `StaticInputs`
that the caller fills before each call, parameters, optimizer state and accumulators updated in place, and
the tensors it returns (the same ones at every replay: copy what must outlive the next call). Its Python
code runs once, at capture: no host synchronisation (`.item()`, a branch on a tensor's value) and no Python
state that must change per call. The caller puts into the key whatever the capture bakes in: the tensors it
uses (`tensor_key`), Python flags, hyper-parameters. Another key drops the graph and runs eagerly again.

Where capture is impossible — no CUDA, MINISD_DISABLE_CUDA_GRAPHS=1, or a capture that fails (warned once;
then every Replayer of that name runs eagerly for the rest of the process) — `fn` runs eagerly at every call,
computing the same thing.
"""
import contextlib
import os
import warnings

import torch


class CudaGraphs:
    """Capture and replay with torch.cuda.CUDAGraph. Eager calls run on a side stream, as a capture's
    warm-up must (the autograd engine then runs backward there too)."""

    def __init__(self):
        self.streams = {}
        self.failed = set()   # names of the functions whose capture failed

    def available(self, device):
        return torch.device(device).type == "cuda" and os.environ.get("MINISD_DISABLE_CUDA_GRAPHS") != "1"

    def eager(self, fn):
        current = torch.cuda.current_stream()
        side = self.streams.setdefault(current.device, torch.cuda.Stream(current.device))
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = fn()
        current.wait_stream(side)
        return out

    def synchronize(self):
        torch.cuda.synchronize()

    def capture(self, fn):
        """(graph, fn's outputs): fn recorded, not run; graph.replay() runs it."""
        graph, pool, stream = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle(), torch.cuda.current_stream()
        try:
            # thread_local: a data-loading or pin-memory thread touching CUDA does not break the capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = fn()
        except BaseException:
            abandon_capture(stream, pool)
            raise
        return graph, out


def abandon_capture(stream, pool):
    """Undo what a capture that fails inside torch.cuda.graph leaves behind. Always: its capture stream current
    (ending the capture raises before the context restores `stream`). In torch 2.11 and earlier also: the caching
    allocator still sending that stream's allocations to the graph's `pool` (every later empty_cache(), so every
    later capture, would fail, and an allocation that runs out of memory would not free the cache first), and
    the CUDA generators in capture mode (an eager random draw on the GPU would raise) until a capture ends
    cleanly — a capture of one small kernel does."""
    torch.cuda.set_stream(stream)
    end_allocating = getattr(torch._C, "_cuda_endAllocateToPool", None)
    if end_allocating is not None:
        with contextlib.suppress(RuntimeError):   # torch ended it already, or the capture never began
            end_allocating(stream.device.index, pool)
    with contextlib.suppress(RuntimeError):
        with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
            torch.zeros(1, device=stream.device)
    torch.cuda.set_stream(stream)


BACKEND = CudaGraphs()


class Replayer:
    """fn(), eager or replayed from its capture; one graph alive at a time (its memory pool is freed when
    the key changes or `release()` is called)."""

    def __init__(self, fn, device, name="step"):
        self.fn, self.name = fn, name
        self.backend = BACKEND
        self.enabled = self.backend.available(device) and name not in self.backend.failed
        self.graph = self.outputs = self.key = self.warm_key = None
        self.captures = self.replays = 0

    def __call__(self, key):
        if not self.enabled:
            return self.fn()
        if self.graph is not None and key == self.key:
            self.graph.replay()
            self.replays += 1
            return self.outputs
        self.release()
        if key == self.warm_key:
            try:
                self.graph, self.outputs = self.backend.capture(self.fn)
            except Exception as e:   # an op that cannot be captured, a host synchronisation: stay eager
                self.release()
                self.enabled = False
                self.backend.failed.add(self.name)   # its next Replayers would fail the same way
                warnings.warn(f"CUDA graph capture of the {self.name} failed, running it eagerly: "
                              f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                              RuntimeWarning, stacklevel=2)
                return self.fn()
            self.key = key
            self.captures += 1
            self.graph.replay()
            self.replays += 1
            return self.outputs
        self.warm_key = key
        return self.backend.eager(self.fn)

    def release(self):
        if self.graph is not None:   # its memory pool goes back to the allocator: let its last replay finish
            self.backend.synchronize()
        self.graph = self.outputs = self.key = None


def tensor_key(tensors):
    """What a capture bakes in about `tensors`: where each one's storage is, and its shape."""
    return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)


class StaticInputs(dict):
    """Device buffers a captured function reads; `fill` copies host tensors into them in place (from pinned
    memory without waiting, on a GPU). A buffer is reallocated only when a shape or dtype changes."""

    def __init__(self, device):
        super().__init__()
        self.device = torch.device(device)

    def fill(self, host):
        for name in set(self) - set(host):
            del self[name]
        for name, value in host.items():
            buffer = self.get(name)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self[name] = torch.empty(value.shape, dtype=value.dtype, device=self.device)
            if self.device.type == "cuda" and value.device.type == "cpu":
                buffer.copy_(value.pin_memory(), non_blocking=True)
            else:
                buffer.copy_(value)
        return self


def to_device(tensor, device):
    """A host tensor on `device`; to a GPU through pinned memory and without making the host wait (a
    pageable copy waits for all queued GPU work)."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
