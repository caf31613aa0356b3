"""Dispatch to the fused SeLoRA CUDA op (kernels/), or None to use the PyTorch reference (op.py).

`selora_ops(x)` gives an object with `forward` and `backward` of the reference's signatures when x is
a CUDA tensor, the op builds (JIT at first use, cached on disk; an ahead-of-time `minisd._selora_cuda`
is preferred) and MINISD_DISABLE_CUDA_OP is not "1". A build that fails, or a built op that disagrees
with the reference on a small random problem at first use, warns once and the reference is used for
the rest of the process: a wrong kernel never trains silently. The first use may come inside a
trainer's autocast region: the build and the check run with autocast off, as the op itself does.
"""
import contextlib
import functools
import importlib.util
import os
import warnings
from pathlib import Path

import torch

from .op import selora_backward, selora_forward

BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "kernels" / "build.py"


class FusedSeLoRAOps:
    """The compiled op behind the reference's function signatures."""

    def __init__(self, extension):
        self.extension = extension

    def forward(self, x, weight, bias, lora_A, lora_B, scale, candidate=None):
        return self.extension.forward(x, weight, bias, lora_A, lora_B, float(scale), candidate)

    def backward(self, grad_y, x, weight, lora_A, lora_B, u, scale, n_samples, fisher, need_grad_x):
        return self.extension.backward(grad_y, x, weight, lora_A, lora_B, u, float(scale), int(n_samples),
                                       fisher or "", bool(need_grad_x))


def selora_ops(x):
    """The fused op for tensors like x, or None when the reference must be used."""
    if os.environ.get("MINISD_DISABLE_CUDA_OP") == "1" or not _is_cuda(x):
        return None
    return _fused_ops()


def _is_cuda(x):
    return x.is_cuda


def _no_autocast():
    """Autocast off on every device type the op or its check runs on."""
    stack = contextlib.ExitStack()
    for device_type in ("cuda", "cpu"):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


@functools.cache
def _fused_ops():
    try:
        with _no_autocast():
            ops = FusedSeLoRAOps(_build())
            _self_check(ops)
        return ops
    except Exception as e:  # no toolkit, compile error, unsupported GPU, wrong results: the reference works
        warnings.warn(f"fused SeLoRA CUDA op unavailable, using the PyTorch reference: {type(e).__name__}: {e}",
                      RuntimeWarning, stacklevel=3)
        return None


# The self-check's problems: (dtype, samples, tokens, in, out, rank, tolerance relative to the largest value).
# fp32 takes the CUDA-core Fisher kernel; bf16 at rank 16 the tensor-core one, over two token stages, with
# 16-byte loads on one side (136 columns) and element loads on the other (36): what only the device can get
# wrong (wmma fragments, vector loads) is checked before the op trains anything.
SELF_CHECKS = ((torch.float32, 2, 5, 48, 40, 3, 1e-4), (torch.bfloat16, 2, 80, 136, 36, 16, 2e-2))


def _self_check(ops, device=None):
    """Forward, backward and Fisher terms of `ops` (on `device`, default the current GPU) against the
    reference, computed in fp64 from the same inputs, on small problems."""
    device = device or torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    names = ["y", "u", "grad_x", "grad_A", "grad_B", "fisher_A", "fisher_B", "fisher_new", "grad_new"]
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # a user's TF32 setting must not fail the check
    try:
        for dtype, n, t, d_in, d_out, r, tolerance in SELF_CHECKS:
            args = [torch.randn(n * t, d_in, generator=g), torch.randn(d_out, d_in, generator=g),
                    torch.randn(d_out, generator=g), torch.randn(r, d_in, generator=g),
                    torch.randn(d_out, r, generator=g), torch.randn(n * t, d_out, generator=g),
                    torch.randn(d_in, generator=g)]
            args = [a.to(dtype) for a in args]
            results = []
            for forward, backward, where, precision in ((selora_forward, selora_backward, "cpu", torch.float64),
                                                        (ops.forward, ops.backward, device, dtype)):
                x, w, b, a, bb, grad_y, candidate = (v.to(where, precision) for v in args)
                y, u = forward(x, w, b, a, bb, 0.5, candidate)
                results.append([y, u, *backward(grad_y, x, w, a, bb, u, 0.5, n, "sample", True)])
            for name, ref, got in zip(names, *results):
                err = ((got.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                if not err <= tolerance:
                    raise RuntimeError(f"its {name} differs from the PyTorch reference by {err:.2e} (relative) on a "
                                       f"{dtype} self-test")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _build():
    """The extension module: the ahead-of-time build if installed, else compiled now by kernels/build.py."""
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise RuntimeError(f"the kernels need compute capability >= 8.0, this GPU has {major}.{minor}")
    try:
        from minisd import _selora_cuda
        return _selora_cuda
    except ImportError:
        pass
    if not BUILD_SCRIPT.exists():
        raise RuntimeError(f"{BUILD_SCRIPT} is missing (install minisd from a source checkout to build the op)")
    spec = importlib.util.spec_from_file_location("minisd_kernels_build", BUILD_SCRIPT)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.load_extension()
