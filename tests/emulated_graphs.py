"""CUDA-graph capture and replay emulated on the CPU, to rehearse the code that captures.

Capture runs the function once under a dispatch mode that records every aten operation; like a real capture
it changes no values of tensors that existed before (its writes go to scratch copies), and a host
synchronisation (`.item()`, a data-dependent shape) raises. In-place view changes (`squeeze_`, `t_`) are
metadata: made at once, as a real capture makes them on the host. Each recorded tensor is pinned as it was
when the operation ran (its storage, sizes, strides, offset), as a kernel in a graph is baked with pointers
and layouts. Replay re-runs the recorded operations on the pinned tensors: fresh results are copied into
the storage the capture produced (a graph's memory pool) and recorded writes land in the storage they named.
Python code runs only at capture, so state that a step keeps in Python rather than in tensors is not updated
by a replay, and a tensor replaced after the capture is not seen by it — as on a GPU.
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


def pinned(x):
    """x's storage with the sizes, strides and offset it has now (unchanged by later in-place view ops)."""
    return x.as_strided(x.size(), x.stride(), x.storage_offset()) if isinstance(x, torch.Tensor) else x


def storage(t):
    return t.untyped_storage().data_ptr()


class Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in SYNCHRONISING:
            raise RuntimeError(f"{func} synchronises with the host: not allowed while capturing")
        if torch.Tag.inplace_view in func.tags:
            return func(*args, **kwargs)
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
            self.ops.append((func, tree_map(pinned, args), tree_map(pinned, kwargs), tree_map(pinned, out),
                             {storage(t) for t in written}))
        return out


class EmulatedGraph:
    def __init__(self, ops):
        self.ops = ops

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out, written in self.ops:
            if returns_view(func) and not written:
                continue   # the recorded view aliases the recorded storage already
            result = func(*args, **kwargs)
            for fresh, kept in zip(tree_flatten(result)[0], tree_flatten(out)[0]):
                if isinstance(kept, torch.Tensor) and storage(kept) not in written:
                    kept.copy_(fresh)


class EmulatedGraphs:
    """graphs.CudaGraphs' interface on the CPU."""

    def __init__(self):
        self.captured = 0
        self.failed = set()

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
