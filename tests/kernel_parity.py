"""Parity of the fused SeLoRA op with the PyTorch reference, and the launch branches of its Fisher kernels.

Shared by tests/test_fused_kernels.py (the CPU emulation; the GPU) and bench/kernel_branches.py (the
compute-sanitizer driver of bench/gpu.sh).
"""
import torch

from minisd.adapters.op import selora_backward, selora_forward

NAMES = ("y", "u", "grad_x", "grad_A", "grad_B", "fisher_A", "fisher_B", "fisher_new", "grad_new")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FISHER_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# (samples, tokens, in, out, bias, rank, dtype) for a 132-multiprocessor GPU (H100/H200), which together take
# every launch branch of the Fisher kernels (REQUIRED_BRANCHES): tokens 520 in 40/64 columns split each
# sample's tokens into runs and allow 16-byte loads; 77 tokens of 37/21 columns make one run of element loads.
# Ranks 1…7 give every column count per thread of the CUDA-core kernel, 11/15/17 fp32's widest and its
# slices, 16…80 each number of tensor-core fragments and a second slice.
_LONG, _TEXT = (2, 520, 64, 40, True), (4, 77, 37, 21, False)
BRANCH_CASES = (
    [(*_LONG, r, dt) for dt in (torch.bfloat16, torch.float16) for r in (1, 2, 4, 5, 7, 16, 40, 64, 80)]
    + [(*_TEXT, r, dt) for dt in (torch.bfloat16, torch.float16) for r in (1, 16)]
    + [(*_LONG, r, torch.float32) for r in (1, 2, 4, 5, 7, 11, 15, 17)]
    + [(*_TEXT, r, torch.float32) for r in (1, 17)]
    + [(*_LONG, r, torch.float64) for r in (1, 9)] + [(*_TEXT, 4, torch.float64)]
)


def _family_branches(dtype, columns_per_thread):
    family = "tensor cores" if columns_per_thread == 0 else "CUDA cores"
    return {(dtype, family, b) for b in ("one run", "runs", "16-byte loads", "element loads")}


REQUIRED_BRANCHES = set().union(
    *[{(d, "CUDA cores", f"{k} columns per thread") for k in (1, 2, 3, 4, 5, 6, 8)} for d in ("fp16", "bf16", "fp32")],
    *[_family_branches(d, 1) for d in ("fp16", "bf16", "fp32", "fp64")],
    *[{(d, "tensor cores", f"{f} fragments") for f in range(1, 6)} | {(d, "tensor cores", "slices")}
      | _family_branches(d, 0) for d in ("fp16", "bf16")],
    {("fp32", "CUDA cores", f"{k} columns per thread") for k in (12, 16)},
    {(d, "CUDA cores", "slices") for d in ("fp32", "fp64")},
)


def launches(samples, tokens, d_in, d_out, rank):
    """(n, q, tokens, samples) of the two Fisher-kernel launches of a backward with per-sample Fisher terms:
    grad_y with [u | p] (the candidate's column), and x with v."""
    return [(d_out, rank + 1, tokens, samples), (d_in, rank, tokens, samples)]


def branches(plan, dtype, q):
    """The launch branches one plan (the extension's fisher_plan) takes."""
    d = DTYPE_NAMES[dtype]
    if plan["tensor_cores"]:
        kernel = (d, "tensor cores", f"{min(5, -(-min(q, 80) // 16))} fragments")
        family = "tensor cores"
    else:
        kernel = (d, "CUDA cores", f"{plan['qpt']} columns per thread")
        family = "CUDA cores"
    taken = {kernel, (d, family, "runs" if plan["runs"] > 1 else "one run"),
             (d, family, "16-byte loads" if plan["vectorized"] else "element loads")}
    if plan["slices"] > 1:
        taken.add((d, family, "slices"))
    return taken


def case_branches(extension, case, multiprocessors):
    samples, tokens, d_in, d_out, _, rank, dtype = case
    return set().union(*[branches(extension.fisher_plan(n, q, t, s, dtype, multiprocessors), dtype, q)
                         for n, q, t, s in launches(samples, tokens, d_in, d_out, rank)])


def random_case(samples, tokens, d_in, d_out, bias, rank, dtype, device="cuda", seed=0):
    """Random operands of one layer call; fresh values for every seed, never zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape, std=1.0: (std * torch.randn(*shape, generator=g, device=device)).to(dtype)  # noqa: E731
    M = samples * tokens
    return dict(x=rand(M, d_in), weight=rand(d_out, d_in, std=d_in ** -0.5),
                bias=rand(d_out, std=0.1) if bias else None, lora_A=rand(rank, d_in, std=d_in ** -0.5),
                lora_B=rand(d_out, rank, std=rank ** -0.5), grad_y=rand(M, d_out),
                candidate=rand(d_in, std=d_in ** -0.5), scale=0.5, n_samples=samples)


def run(forward, backward, case, fisher, need_grad_x):
    """Forward and backward with Fisher mode `fisher` (None, "sample" or "batch")."""
    c = case
    y, u = forward(c["x"], c["weight"], c["bias"], c["lora_A"], c["lora_B"], c["scale"],
                   c["candidate"] if fisher else None)
    grads = backward(c["grad_y"], c["x"], c["weight"], c["lora_A"], c["lora_B"], u, c["scale"], c["n_samples"],
                     fisher, need_grad_x)
    return (y, u) + tuple(grads)


def rel_err(a, b):
    """Largest error relative to the largest true value (NaN where either has one)."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def mismatches(ops, case, dtype):
    """What differs between `ops` and the reference (computed in fp64) in each Fisher mode: [] when all agree."""
    exact = {k: v.double() if torch.is_tensor(v) else v for k, v in case.items()}
    found = []
    for mode, need_grad_x in (("sample", True), (None, False), ("batch", True)):
        got = run(ops.forward, ops.backward, case, mode, need_grad_x)
        want = run(selora_forward, selora_backward, exact, mode, need_grad_x)
        for name, a, b in zip(NAMES, got, want):
            where = f"{name} (fisher={mode})"
            if b is None:
                if a is not None:
                    found.append(f"{where} must be None")
                continue
            fisher = name.startswith("fisher") or name == "grad_new"
            want_dtype = (torch.float64 if dtype == torch.float64 else torch.float32) if fisher else dtype
            if a.dtype != want_dtype or a.shape != b.shape:
                found.append(f"{where}: {a.dtype} {list(a.shape)}, expected {want_dtype} {list(b.shape)}")
                continue
            tol = (FISHER_TOLERANCE if fisher else TOLERANCE)[dtype]
            err = rel_err(a, b)
            if not err <= tol:  # NaN fails
                found.append(f"{where}: relative error {err:.2e} > {tol:.0e}")
    return found
