"""The fused SeLoRA CUDA op: dispatch and fallback (CPU), the GPU-free build check (slow), and parity
with the PyTorch reference: on every SD-1.5 shape class on a GPU, and on small shapes of each class with
the kernels emulated on the CPU."""
import copy
import inspect
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minisd import fused
from minisd.adapters import SeLoRALinear, selora
from minisd.adapters.op import selora_backward, selora_forward
import emulated_op
from helpers import load_script

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "kernels" / "build.py"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FakeExtension:
    def forward(self, *args):
        return ("forward",) + args

    def backward(self, *args):
        return ("backward",) + args


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """A process that has not yet decided whether the op builds; CUDA faked, the build recorded."""
    fused._fused_ops.cache_clear()
    monkeypatch.delenv("MINISD_DISABLE_CUDA_OP", raising=False)
    monkeypatch.setattr(fused, "_is_cuda", lambda x: True)
    builds = []

    def build():
        builds.append(1)
        return FakeExtension()

    monkeypatch.setattr(fused, "_build", build)
    monkeypatch.setattr(fused, "_self_check", lambda ops: None)
    yield builds
    fused._fused_ops.cache_clear()


class ReferenceExtension:
    """An extension computing exactly what the reference does (argument order of the compiled module)."""

    def forward(self, *args):
        return selora_forward(*args)

    def backward(self, *args):
        return selora_backward(*args)


class WrongFisherExtension(ReferenceExtension):
    def backward(self, *args):
        grad_x, grad_A, grad_B, fisher_A, fisher_B, fisher_new, grad_new = selora_backward(*args)
        return grad_x, grad_A, grad_B, fisher_A, fisher_B * 1.01, fisher_new, grad_new


def test_self_check_accepts_a_correct_op():
    fused._self_check(fused.FusedSeLoRAOps(ReferenceExtension()), torch.device("cpu"))


def test_self_check_rejects_a_wrong_op():
    with pytest.raises(RuntimeError, match="fisher_B differs from the PyTorch reference"):
        fused._self_check(fused.FusedSeLoRAOps(WrongFisherExtension()), torch.device("cpu"))


def test_op_failing_its_self_check_falls_back(monkeypatch):
    fused._fused_ops.cache_clear()
    monkeypatch.delenv("MINISD_DISABLE_CUDA_OP", raising=False)
    monkeypatch.setattr(fused, "_is_cuda", lambda x: True)
    monkeypatch.setattr(fused, "_build", WrongFisherExtension)
    monkeypatch.setattr(fused, "_self_check", lambda ops, real=fused._self_check: real(ops, torch.device("cpu")))
    with pytest.warns(RuntimeWarning, match="fisher_B differs"):
        assert fused.selora_ops(torch.zeros(2, 3)) is None
    fused._fused_ops.cache_clear()


def test_cpu_tensors_use_the_reference(monkeypatch):
    monkeypatch.delenv("MINISD_DISABLE_CUDA_OP", raising=False)
    monkeypatch.setattr(fused, "_build", lambda: pytest.fail("no build may be tried for CPU tensors"))
    fused._fused_ops.cache_clear()
    assert fused.selora_ops(torch.zeros(2, 3)) is None


def test_cuda_tensors_get_the_fused_op(fresh_dispatch):
    ops = fused.selora_ops(torch.zeros(2, 3))
    assert isinstance(ops.extension, FakeExtension)
    assert fused.selora_ops(torch.zeros(2, 3)) is ops and len(fresh_dispatch) == 1  # built once per process


def test_disable_variable_forces_the_reference(fresh_dispatch, monkeypatch):
    monkeypatch.setenv("MINISD_DISABLE_CUDA_OP", "1")
    assert fused.selora_ops(torch.zeros(2, 3)) is None
    assert not fresh_dispatch
    monkeypatch.setenv("MINISD_DISABLE_CUDA_OP", "0")
    assert fused.selora_ops(torch.zeros(2, 3)) is not None


def test_failed_build_warns_once_and_falls_back(fresh_dispatch, monkeypatch):
    def broken_build():
        fresh_dispatch.append(1)
        raise RuntimeError("Error building extension 'minisd_selora': nvcc fatal")

    monkeypatch.setattr(fused, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="nvcc fatal") as caught:
        assert fused.selora_ops(torch.zeros(2, 3)) is None
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.selora_ops(torch.zeros(2, 3)) is None
    assert len(fresh_dispatch) == 1


def test_old_gpus_fall_back(monkeypatch):
    """The unpatched build refuses GPUs older than sm_80 with a warning that says so."""
    fused._fused_ops.cache_clear()
    monkeypatch.delenv("MINISD_DISABLE_CUDA_OP", raising=False)
    monkeypatch.setattr(fused, "_is_cuda", lambda x: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.warns(RuntimeWarning, match="compute capability >= 8.0, this GPU has 7.5"):
        assert fused.selora_ops(torch.zeros(2, 3)) is None
    fused._fused_ops.cache_clear()


def test_fused_ops_keep_the_reference_signatures(fresh_dispatch):
    ops = fused.selora_ops(torch.zeros(2, 3))
    for method, reference in ((ops.forward, selora_forward), (ops.backward, selora_backward)):
        assert list(inspect.signature(method).parameters) == list(inspect.signature(reference).parameters)
    assert ops.forward(1, 2, None, 4, 5, torch.tensor(0.5)) == ("forward", 1, 2, None, 4, 5, 0.5, None)
    assert ops.backward(1, 2, 3, 4, 5, 6, 2, 4.0, None, 1) == ("backward", 1, 2, 3, 4, 5, 6, 2.0, 4, "", True)
    assert ops.backward(1, 2, 3, 4, 5, 6, 2, 4.0, "batch", 1)[-2] == "batch"


def test_cache_folder_follows_sources_and_setting(tmp_path, monkeypatch):
    build = load_script("kernels/build.py")
    source = tmp_path / "op.cu"
    source.write_text("a")
    monkeypatch.setattr(build, "SOURCES", [source])
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    first = build.cache_dir()
    assert first.parent == tmp_path / "cache" / "kernels" and first.name.startswith(torch.__version__ + "-")
    assert build.cache_dir() == first
    source.write_text("b")
    assert build.cache_dir() != first


def test_build_check_without_toolkit_names_the_problem(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = str(tmp_path)  # no nvcc anywhere
    done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "nvcc is not on PATH" in done.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_toolkit_is_found_through_the_nvcc_on_path(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = Path(load_script("kernels/build.py").cuda_home())
    assert (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists()


needs_toolkit = pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                                   reason="needs nvcc and a CUDA build of torch")


@needs_toolkit
def test_build_check_reports_the_compiler_message(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.delenv("CUDA_HOME", raising=False)  # the build sets both; undo that afterwards
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    build = load_script("kernels/build.py")
    broken = tmp_path / "broken.cu"
    broken.write_text("int f() { return undefined_name; }\n")
    monkeypatch.setattr(build, "SOURCES", [broken])
    assert build.check() == 1
    assert '"undefined_name" is undefined' in capsys.readouterr().err


@needs_toolkit
def test_setup_extension_builds_the_package_module(monkeypatch):
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.chdir(REPO)  # setup.py runs from the repository root
    (extension,) = load_script("kernels/build.py").cuda_extensions()
    assert extension.name == "minisd._selora_cuda"
    assert all(Path(source).exists() and not Path(source).is_absolute() for source in extension.sources)
    assert "-gencode=arch=compute_90,code=sm_90" in extension.extra_compile_args["nvcc"]


@pytest.mark.slow
@needs_toolkit
def test_kernels_compile_without_a_gpu():
    done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


# ------------------------------------------------------------------------------------------ parity

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
# The same classes at sizes the CPU emulation runs in seconds, with widths that are not multiples of the
# kernel's 64-column tile and (last) of one warp, and a multiprocessor count for each that makes the
# Fisher kernel split samples' tokens into several runs or keep one run per sample.
EMULATED_SHAPES = [
    ((4, 77, 160, 96, False), 132),
    ((2, 300, 72, 200, True), 8),
    ((2, 150, 160, 40, True), 132),
    ((3, 40, 96, 130, False), 1),
    ((8, 1, 64, 136, True), 132),
    ((2, 33, 20, 24, True), 2),
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
FISHER_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
NAMES = ("y", "u", "grad_x", "grad_A", "grad_B", "fisher_A", "fisher_B", "fisher_new", "grad_new")


def shape_id(shape):
    return "N{}xT{}_{}to{}{}".format(*shape[:4], "_bias" * shape[4])


def rel_err(a, b):
    """Largest error relative to the largest true value."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


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


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    """The op's own sources, kernels included, built for the CPU (tests/emulated_cuda.h)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("needs a C++ compiler")
    extension = emulated_op.build(tmp_path_factory.mktemp("emulated_op"))
    extension.set_poison(True)
    return fused.FusedSeLoRAOps(extension)


def random_case(samples, tokens, d_in, d_out, bias, rank, dtype, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape, std=1.0: (std * torch.randn(*shape, generator=g, device=device)).to(dtype)
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


def assert_matches_reference(ops, case, dtype):
    """Every output of `ops`, in each Fisher mode, against the reference computed in fp64."""
    exact = {k: v.double() if torch.is_tensor(v) else v for k, v in case.items()}
    for mode, need_grad_x in (("sample", True), (None, False), ("batch", True)):
        got = run(ops.forward, ops.backward, case, mode, need_grad_x)
        want = run(selora_forward, selora_backward, exact, mode, need_grad_x)
        for name, a, b in zip(NAMES, got, want):
            if b is None:
                assert a is None, f"{name} must be None"
                continue
            fisher = name.startswith("fisher") or name == "grad_new"
            assert a.dtype == (torch.float32 if fisher else dtype), name
            assert a.shape == b.shape, name
            tol = FISHER_TOLERANCE[dtype] if fisher else TOLERANCE[dtype]
            assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.2e} > {tol:.0e}"


@needs_cuda
@pytest.mark.parametrize("rank", [1, 4, 17, 64])
@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_fused_matches_reference(cuda_ops, shape, dtype, rank):
    assert_matches_reference(cuda_ops, random_case(*shape, rank, dtype), dtype)


@pytest.mark.parametrize("rank", [1, 4, 17, 64, 80])
@DTYPES
@pytest.mark.parametrize("shape, multiprocessors", EMULATED_SHAPES, ids=lambda s: shape_id(s) if isinstance(s, tuple) else f"{s}sm")
def test_emulated_kernels_match_reference(emulated_ops, monkeypatch, shape, multiprocessors, dtype, rank):
    """The CUDA sources run on the CPU: tiling, indexing and the two-stage Fisher reduction as the GPU runs them."""
    monkeypatch.setenv("MINISD_EMULATED_SMS", str(multiprocessors))
    assert_matches_reference(emulated_ops, random_case(*shape, rank, dtype, device="cpu"), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 64])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_emulated_kernels_match_reference_at_full_size(emulated_ops, shape, rank):
    assert_matches_reference(emulated_ops, random_case(*shape, rank, torch.float32, device="cpu"), torch.float32)


@needs_cuda
def test_fused_backward_is_deterministic(cuda_ops):
    case = random_case(8, 1024, 320, 640, True, 4, torch.bfloat16)
    first = run(cuda_ops.forward, cuda_ops.backward, case, "sample", True)
    second = run(cuda_ops.forward, cuda_ops.backward, case, "sample", True)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def check_non_contiguous_inputs(ops, device):
    case = random_case(2, 77, 768, 320, True, 4, torch.float32, device)
    strided = dict(case, x=case["x"].t().contiguous().t(), weight=case["weight"].t().contiguous().t(),
                   grad_y=case["grad_y"].t().contiguous().t())
    assert not strided["x"].is_contiguous()
    for name, a, b in zip(NAMES, run(ops.forward, ops.backward, strided, "sample", True),
                          run(ops.forward, ops.backward, case, "sample", True)):
        assert torch.equal(a, b), name


def check_bad_shapes_are_named(ops, device):
    c = random_case(2, 8, 64, 32, True, 4, torch.float32, device)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \[32, 4\], got \[32, 5\]"):
        ops.forward(c["x"], c["weight"], c["bias"], c["lora_A"], c["lora_B"].new_zeros(32, 5), 1.0)
    y, u = ops.forward(c["x"], c["weight"], c["bias"], c["lora_A"], c["lora_B"], 1.0)
    with pytest.raises(RuntimeError, match="n_samples = 3 does not divide the 16 rows of x"):
        ops.backward(c["grad_y"], c["x"], c["weight"], c["lora_A"], c["lora_B"], u, 1.0, 3, None, True)


@needs_cuda
@pytest.mark.parametrize("check", [check_non_contiguous_inputs, check_bad_shapes_are_named])
def test_fused_input_handling(cuda_ops, check):
    check(cuda_ops, "cuda")


@pytest.mark.parametrize("check", [check_non_contiguous_inputs, check_bad_shapes_are_named])
def test_emulated_input_handling(emulated_ops, check):
    check(emulated_ops, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_op_drives_a_selora_layer_like_the_reference(emulated_ops, monkeypatch, dtype):
    """A layer's whole path through the op as on a GPU: [N, T, in] inputs, autocast, Fisher terms
    accumulated over two backwards, then growth and another step at the new rank."""
    torch.manual_seed(8)
    reference = SeLoRALinear(nn.Linear(96, 136), alpha=2.0)
    nn.init.normal_(reference.lora_B, std=0.5)
    layers = {"reference": reference, "emulated": copy.deepcopy(reference)}
    offered = {"reference": None, "emulated": emulated_ops}
    x, target = torch.randn(4, 77, 96), torch.randn(4, 77, 136)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for _ in range(2):
        for name, layer in layers.items():
            monkeypatch.setattr(selora, "_fused", [SimpleNamespace(selora_ops=lambda x, ops=offered[name]: ops)])
            layer.track_fisher = True
            for half in (x[:2], x[2:]):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    y = layer(half)
                ((y.float() - target[:2]) ** 2).mean().backward()
        want, got = layers.values()
        for name in ("fisher_A", "fisher_B", "fisher_new"):
            assert rel_err(getattr(got, name), getattr(want, name)) <= tol, name
        for name in ("lora_A", "lora_B"):
            assert rel_err(getattr(got, name).grad, getattr(want, name).grad) <= tol, name
        assert got.fisher_ratio() == pytest.approx(want.fisher_ratio(), rel=tol)
        for layer in layers.values():
            layer.expand()
            layer.lora_A.grad = layer.lora_B.grad = None
            layer.reset_fisher(torch.Generator().manual_seed(1))
    assert got.rank == 3 and torch.equal(got.lora_A, want.lora_A)
