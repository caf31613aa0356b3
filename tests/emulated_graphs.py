"""CUDA-graph capture and replay emulated on the CPU, to rehearse the code that captures.

Capture runs the function once under a dispatch mode that records every aten operation with its tensors;
like a real capture it changes no tensor that existed before (its writes go to scratch copies), and a host
synchronisation (`.item()`, a data-dependent shape) raises. Replay re-runs the recorded operations on the
recorded tensors: fresh results are copied into the tensors the capture produced (fixed storage, as in a
graph's memory pool) and recorded writes land on the tensors they named. Python code runs only at capture,
so state that a step keeps in Python rather than in tensors is not updated by a replay — as on a GPU.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
SYNCHRONISING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten.is_nonzero,
                 aten.unique_consecutive, aten._unique2, aten.repeat_interleave}


def written_tensors(func, args, kwargs):
    """The tensors an op writes to (schema `Tensor(a!)` arguments, in-place and out= alike)."""
    written = []
    for position, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        written += [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]
    return written


def returns_view(func):
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNCHRONISING:
            raise RuntimeError(f"{func} synchronises with the host: not allowed while capturing")
        written = written_tensors(func, args, kwargs)
        if written:
            scratch = {id(t): t.clone() for t in written}
            originals = {id(copy): t for t in written for copy in [scratch[id(t)]]}
            swap = lambda x: scratch.get(id(x), x) if isinstance(x, torch.Tensor) else x  # noqa: E731
            out = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            out = tree_map(lambda x: originals.get(id(x), x) if isinstance(x, torch.Tensor) else x, out)
        else:
            out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]) or written:
            self.ops.append((func, args, kwargs, out, written))
        return out


class EmulatedGraph:
    def __init__(self, ops):
        self.ops = ops

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out, written in self.ops:
            if returns_view(func) and not written:
                continue   # the recorded view still aliases the recorded tensor
            result = func(*args, **kwargs)
            for fresh, kept in zip(tree_flatten(result)[0], tree_flatten(out)[0]):
                if isinstance(kept, torch.Tensor) and fresh is not kept and not any(kept is t for t in written):
                    kept.copy_(fresh)


class EmulatedGraphs:
    """graphs.CudaGraphs' interface on the CPU."""

    def __init__(self):
        self.captured = 0

    def available(self, device):
        return True

    def eager(self, fn):
        return fn()

    def synchronize(self):
        pass

    def capture(self, fn):
        recorder = Recorder()
        with recorder:
            out = fn()
        self.captured += 1
        return EmulatedGraph(recorder.ops), out
