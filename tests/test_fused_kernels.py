"""Parity of the fused SeLoRA op's kernels with the PyTorch reference: the op's own sources, kernels included,
run on the CPU (tests/emulated_cuda.h) on small shapes of every SD-1.5 shape class and through every launch
branch of the Fisher kernels; on a GPU at full size. Every output starts NaN-filled, so an element a kernel
skips fails its comparison."""
import warnings

import pytest
import torch

import kernel_parity as kp
from minisd.adapters import fused
from minisd.adapters.op import selora_backward, selora_forward

# (samples, tokens per sample, in, out, bias): every token count SD-1.5 produces at 512 and 224 px
# (text 77, latents 64², 32², 28², 16², 8², 7², time embeddings 1) over its layer widths, and each
# way the op may compute y and grad x (low-rank part folded into W when rows > in, resp. > out).
SHAPES = [
    (4, 77, 768, 320, False),     # neither folded
    (2, 4096, 320, 2560, True),   # both folded
    (2, 1024, 640, 640, False),
    (2, 784, 1280, 320, True),
    (4, 256, 640, 5120, True),    # forward folded only
    (8, 64, 5120, 320, True),     # backward folded only
    (3, 49, 1280, 1280, False),
    (8, 1, 320, 1280, True),
]
# The same classes at sizes the CPU emulation runs in well under a second, with widths that are not
# multiples of the kernels' column tiles (nor, 130, of a 16-byte load), and a multiprocessor count for each
# that makes the Fisher kernels split samples' tokens into runs or keep one run per sample.
EMULATED_SHAPES = [
    ((4, 77, 160, 96, False), 132),   # text
    ((1, 4096, 24, 40, False), 132),  # 64² latents
    ((2, 1024, 40, 48, True), 16),    # 32²
    ((2, 784, 72, 200, True), 8),     # 28²
    ((2, 256, 160, 40, True), 132),   # 16²
    ((2, 64, 20, 24, True), 2),       # 8²
    ((3, 49, 96, 130, False), 1),     # 7²
    ((8, 1, 64, 136, True), 132),     # time embeddings
]
RANKS = [1, 4, 16, 17, 64]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)


def shape_id(shape):
    return "N{}xT{}_{}to{}{}".format(*shape[:4], "_bias" * shape[4])


def case_id(case):
    return f"{shape_id(case[:5])}_r{case[5]}_{kp.DTYPE_NAMES[case[6]]}"


def assert_matches_reference(ops, case, dtype):
    found = kp.mismatches(ops, case, dtype)
    assert not found, "; ".join(found)


@pytest.fixture(scope="module")
def cuda_ops():
    fused._fused_ops.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed build must fail these tests, not compare the reference to itself
        ops = fused.selora_ops(torch.zeros(1, device="cuda"))
    assert ops is not None
    ops.extension.set_poison(True)  # every output starts as NaN, so an element a kernel skips shows
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs in full precision, as the tolerances assume
    yield ops
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ops.extension.set_poison(False)


@pytest.fixture
def emulated_ops(emulated_extension):
    return fused.FusedSeLoRAOps(emulated_extension)


@pytest.mark.cuda
@pytest.mark.parametrize("rank", RANKS)
@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_matches_reference(cuda_ops, shape, dtype, rank):
    assert_matches_reference(cuda_ops, kp.random_case(*shape, rank, dtype), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("case", kp.BRANCH_CASES, ids=case_id)
def test_fused_launch_branches_match_reference(cuda_ops, case):
    assert_matches_reference(cuda_ops, kp.random_case(*case), case[-1])


@pytest.mark.parametrize("rank", RANKS + [80])
@DTYPES
@pytest.mark.parametrize("shape, multiprocessors", EMULATED_SHAPES,
                         ids=lambda s: shape_id(s) if isinstance(s, tuple) else f"{s}sm")
def test_emulated_kernels_match_reference(emulated_ops, monkeypatch, shape, multiprocessors, dtype, rank):
    """The CUDA sources run on the CPU: tiling, indexing and the two-stage Fisher reduction as the GPU runs them."""
    monkeypatch.setenv("MINISD_EMULATED_SMS", str(multiprocessors))
    assert_matches_reference(emulated_ops, kp.random_case(*shape, rank, dtype, device="cpu"), dtype)


def test_branch_cases_take_every_launch_branch(emulated_extension):
    """bench/kernel_branches.py (the compute-sanitizer driver) reaches every branch on a 132-SM GPU."""
    taken = set().union(*[kp.case_branches(emulated_extension, case, 132) for case in kp.BRANCH_CASES])
    assert kp.REQUIRED_BRANCHES <= taken, sorted(kp.REQUIRED_BRANCHES - taken)


@pytest.mark.parametrize("case", [c for c in kp.BRANCH_CASES if c[-1] in (torch.float32, torch.float64)
                                  or c[5] in (2, 5, 7, 40)], ids=case_id)
def test_emulated_launch_branches_match_reference(emulated_ops, monkeypatch, case):
    """The branches the grid above leaves out: the other column counts per thread, fp64, three fragments."""
    monkeypatch.setenv("MINISD_EMULATED_SMS", "132")
    assert_matches_reference(emulated_ops, kp.random_case(*case, device="cpu"), case[-1])


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 2, 5, 7, 11, 15, 40, 100])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, multiprocessors", EMULATED_SHAPES,
                         ids=lambda s: shape_id(s) if isinstance(s, tuple) else f"{s}sm")
def test_emulated_kernels_match_reference_on_more_ranks(emulated_ops, monkeypatch, shape, multiprocessors, dtype,
                                                        rank):
    monkeypatch.setenv("MINISD_EMULATED_SMS", str(multiprocessors))
    assert_matches_reference(emulated_ops, kp.random_case(*shape, rank, dtype, device="cpu"), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_emulated_kernels_match_reference_at_full_size(emulated_ops, shape, rank):
    assert_matches_reference(emulated_ops, kp.random_case(*shape, rank, torch.float32, device="cpu"), torch.float32)


def test_emulated_fisher_kernels_alone_equal_the_op(emulated_extension):
    """The benchmark's entry to the Fisher kernels computes what the op's backward does."""
    case = kp.random_case(2, 150, 64, 40, True, 3, torch.bfloat16, device="cpu")
    ops = fused.FusedSeLoRAOps(emulated_extension)
    y, u, _, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new = kp.run(ops.forward, ops.backward, case,
                                                                               "sample", False)
    v = case["grad_y"] @ case["lora_B"]
    grad, fisher, grad_extra, fisher_extra = emulated_extension.fisher_kernels(case["grad_y"], u, 3, 2, 0.5)
    assert torch.equal(grad, grad_B) and torch.equal(fisher, fisher_B) and torch.equal(grad_extra, grad_new)
    assert torch.equal(fisher_extra.sum(), fisher_new)
    grad, fisher = emulated_extension.fisher_kernels(case["x"], v, 3, 2, 0.5)
    assert torch.equal(grad.t(), grad_A) and torch.equal(fisher.t(), fisher_A)


@pytest.mark.cuda
def test_fused_backward_is_deterministic(cuda_ops):
    for rank in (4, 64):  # CUDA cores and tensor cores
        case = kp.random_case(8, 1024, 320, 640, True, rank, torch.bfloat16)
        first = kp.run(cuda_ops.forward, cuda_ops.backward, case, "sample", True)
        second = kp.run(cuda_ops.forward, cuda_ops.backward, case, "sample", True)
        for name, a, b in zip(kp.NAMES, first, second):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("d_in, d_out", [(0, 24), (24, 0)])
def test_emulated_op_takes_a_layer_without_inputs_or_outputs(emulated_ops, d_in, d_out):
    """A side of width zero leaves the Fisher kernels nothing to do: no launch (an empty grid is an error on
    the device) and no plan (which would divide by its zero blocks), just the reference's empty or zero terms."""
    g = torch.Generator().manual_seed(0)
    M, r = 10, 3
    case = dict(x=torch.randn(M, d_in, generator=g), weight=torch.randn(d_out, d_in, generator=g),
                bias=torch.randn(d_out, generator=g), lora_A=torch.randn(r, d_in, generator=g),
                lora_B=torch.randn(d_out, r, generator=g), grad_y=torch.randn(M, d_out, generator=g),
                candidate=torch.randn(d_in, generator=g), scale=0.5, n_samples=2)
    for mode in ("sample", "batch", None):
        got = kp.run(emulated_ops.forward, emulated_ops.backward, case, mode, True)
        want = kp.run(selora_forward, selora_backward, case, mode, True)
        for name, a, b in zip(kp.NAMES, got, want):
            assert (a is None) == (b is None), name
            if b is not None:
                torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-5, msg=f"{name} (fisher={mode})")


@pytest.mark.parametrize("rank, dtype", [(4, torch.float32), (16, torch.bfloat16)], ids=["cuda_cores", "tensor_cores"])
def test_emulated_kernels_read_rows_at_any_address(emulated_ops, rank, dtype):
    """Rows a whole number of 16-byte loads wide, starting one element past a 16-byte boundary (a view into
    a larger buffer), take the element loads: a vector load there faults on the device."""
    case = kp.random_case(2, 77, 64, 40, True, rank, dtype, device="cpu")

    def shifted(t):
        moved = t.new_empty(t.numel() + 1)[1:].view_as(t)
        return moved.copy_(t)

    moved = dict(case, x=shifted(case["x"]), grad_y=shifted(case["grad_y"]))
    assert moved["x"].is_contiguous() and moved["x"].data_ptr() % 16 != 0
    assert_matches_reference(emulated_ops, moved, dtype)


def check_non_contiguous_inputs(ops, device):
    case = kp.random_case(2, 77, 768, 320, True, 4, torch.float32, device)
    strided = dict(case, x=case["x"].t().contiguous().t(), weight=case["weight"].t().contiguous().t(),
                   grad_y=case["grad_y"].t().contiguous().t())
    assert not strided["x"].is_contiguous()
    for name, a, b in zip(kp.NAMES, kp.run(ops.forward, ops.backward, strided, "sample", True),
                          kp.run(ops.forward, ops.backward, case, "sample", True)):
        assert torch.equal(a, b), name


def check_bad_shapes_are_named(ops, device):
    c = kp.random_case(2, 8, 64, 32, True, 4, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[32, 4\], got \[32, 5\]"):
        ops.forward(c["x"], c["weight"], c["bias"], c["lora_A"], c["lora_B"].new_zeros(32, 5), 1.0)
    y, u = ops.forward(c["x"], c["weight"], c["bias"], c["lora_A"], c["lora_B"], 1.0)
    with pytest.raises(RuntimeError, match="n_samples = 3 does not divide the 16 rows of x"):
        ops.backward(c["grad_y"], c["x"], c["weight"], c["lora_A"], c["lora_B"], u, 1.0, 3, None, True)


@pytest.mark.cuda
@pytest.mark.parametrize("check", [check_non_contiguous_inputs, check_bad_shapes_are_named])
def test_fused_input_handling(cuda_ops, check):
    check(cuda_ops, "cuda")


@pytest.mark.parametrize("check", [check_non_contiguous_inputs, check_bad_shapes_are_named])
def test_emulated_input_handling(emulated_ops, check):
    check(emulated_ops, "cpu")

