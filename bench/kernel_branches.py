"""Run the fused SeLoRA op once through every launch branch of its Fisher kernels (each column count per
thread of the CUDA-core kernel, each number of tensor-core fragments, slices, samples split into runs or not,
16-byte or element loads; fp64/fp32/fp16/bf16; Fisher terms per sample, per batch and off), checking every
output against the PyTorch reference. bench/gpu.sh runs it under compute-sanitizer (memcheck, racecheck).

    python bench/kernel_branches.py               # the built op, on the GPU
    python bench/kernel_branches.py --emulated    # the op's CPU emulation (the rehearsal)

Exit status 1 when an output differs or a branch was not reached (on a GPU of another multiprocessor count
than the 132 the cases are chosen for, some may not be).
"""
import argparse
import os
import sys
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import kernel_parity as kp  # noqa: E402
from minisd.adapters import fused  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--emulated", action="store_true", help="the op's CPU emulation instead of the built op")
    args = p.parse_args()
    if args.emulated:
        import emulated_op
        os.environ["MINISD_EMULATED_SMS"] = "132"
        device, ops = "cpu", fused.FusedSeLoRAOps(emulated_op.cached_build())
        multiprocessors = 132
    else:
        device = "cuda"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to the reference would check nothing
            ops = fused.selora_ops(torch.zeros(1, device=device))
        multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
        torch.backends.cuda.matmul.allow_tf32 = False
    ops.extension.set_poison(True)

    taken, failures = set(), 0
    for case in kp.BRANCH_CASES:
        found = kp.mismatches(ops, kp.random_case(*case, device=device), case[-1])
        branches = kp.case_branches(ops.extension, case, multiprocessors)
        taken |= branches
        failures += bool(found)
        samples, tokens, d_in, d_out, _, rank, dtype = case
        print(f"{samples}×{tokens} tokens, {d_in}→{d_out}, rank {rank}, {kp.DTYPE_NAMES[dtype]}: "
              f"{'; '.join(found) or 'ok'} [{', '.join(sorted(b[2] for b in branches))}]", flush=True)
    if device == "cuda":
        torch.cuda.synchronize()
    missed = sorted(kp.REQUIRED_BRANCHES - taken)
    for branch in missed:
        print(f"branch not reached with {multiprocessors} multiprocessors: {' / '.join(branch)}")
    print(f"{len(kp.BRANCH_CASES)} cases, {failures} with outputs that differ from the reference, "
          f"{len(kp.REQUIRED_BRANCHES) - len(missed)} of {len(kp.REQUIRED_BRANCHES)} launch branches reached")
    sys.exit(1 if failures or missed else 0)


if __name__ == "__main__":
    main()
