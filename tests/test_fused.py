"""The fused SeLoRA CUDA op: dispatch and fallback, its first use under autocast, the GPU-free build check
(slow), and a SeLoRA layer driven through the op's CPU emulation. Kernel parity: test_fused_kernels.py."""
import copy
import inspect
import os
import shutil
import subprocess
import sys
import unittest.mock
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import kernel_parity as kp
from helpers import load_script, rel_err
from minisd.adapters import SeLoRALinear, fused, selora
from minisd.adapters.op import selora_backward, selora_forward

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "kernels" / "build.py"


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


class WrongTensorCoreExtension(ReferenceExtension):
    """Right wherever the CUDA cores compute the Fisher terms, wrong where the tensor cores do (fp16/bf16,
    rank > 8)."""

    def backward(self, grad_y, x, weight, lora_A, lora_B, u, scale, n_samples, fisher, need_grad_x):
        outputs = list(selora_backward(grad_y, x, weight, lora_A, lora_B, u, scale, n_samples, fisher, need_grad_x))
        if fisher == "sample" and x.dtype in (torch.float16, torch.bfloat16) and lora_A.shape[0] > 8:
            outputs[3] = outputs[3] * 1.1
        return tuple(outputs)


def test_self_check_accepts_a_correct_op():
    fused._self_check(fused.FusedSeLoRAOps(ReferenceExtension()), torch.device("cpu"))


def test_self_check_rejects_a_wrong_op():
    with pytest.raises(RuntimeError, match="fisher_B differs from the PyTorch reference"):
        fused._self_check(fused.FusedSeLoRAOps(WrongFisherExtension()), torch.device("cpu"))


def test_self_check_covers_the_tensor_core_kernel():
    with pytest.raises(RuntimeError, match="fisher_A differs from the PyTorch reference .* torch.bfloat16"):
        fused._self_check(fused.FusedSeLoRAOps(WrongTensorCoreExtension()), torch.device("cpu"))


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


def test_a_build_killed_midway_blocks_no_later_build(tmp_path, monkeypatch):
    """torch's extension builder waits on a `lock` file for as long as it exists; a killed build leaves it."""
    build = load_script("kernels/build.py")
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    folder = build.cache_dir()
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")
    try_lock = ("import fcntl, sys; f = open(sys.argv[1]); "
                "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)")   # fails while another process holds it
    seen = []

    def load(directory, verbose):
        other = subprocess.run([sys.executable, "-c", try_lock, str(folder / "build.flock")], capture_output=True)
        seen.append(((Path(directory) / "lock").exists(), other.returncode))
        return "module"

    monkeypatch.setattr(build, "_load", load)
    assert build.load_extension() == "module"
    assert seen == [(False, 1)]


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

class CountingOps(fused.FusedSeLoRAOps):
    """The emulated op, counting its calls."""

    def __init__(self, extension):
        super().__init__(extension)
        self.calls = 0

    def forward(self, *args):
        self.calls += 1
        return super().forward(*args)


@pytest.fixture
def emulated_dispatch(emulated_extension, monkeypatch):
    """A process whose "CUDA" tensors are the CPU's and whose op builds as the CPU emulation, self-check included."""
    fused._fused_ops.cache_clear()
    monkeypatch.delenv("MINISD_DISABLE_CUDA_OP", raising=False)
    monkeypatch.setattr(fused, "_is_cuda", lambda x: True)
    monkeypatch.setattr(fused, "_build", lambda: emulated_extension)
    monkeypatch.setattr(fused, "FusedSeLoRAOps", CountingOps)
    monkeypatch.setattr(fused, "_self_check", lambda ops, real=fused._self_check: real(ops, torch.device("cpu")))
    yield
    fused._fused_ops.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_first_use_under_autocast_runs_the_fused_op(emulated_dispatch, dtype):
    """A trainer's autocast region around a layer's first call must neither fail the op's build and check nor
    change what the op computes."""
    torch.manual_seed(3)
    layer = SeLoRALinear(nn.Linear(48, 40), alpha=2.0)
    nn.init.normal_(layer.lora_B, std=0.5)
    reference = copy.deepcopy(layer)
    layer.track_fisher = reference.track_fisher = True
    x = torch.randn(2, 5, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
    ops = fused.selora_ops(x)
    assert isinstance(ops, CountingOps) and ops.calls == 3  # the self-check's two forwards, then the layer's
    with torch.autocast("cpu", dtype=dtype):
        with unittest.mock.patch.object(fused, "selora_ops", lambda x: None):
            y_ref = reference(x)
    assert y.dtype == y_ref.dtype == dtype and rel_err(y, y_ref) < 1e-2
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for name in ("fisher_A", "fisher_B", "fisher_new"):
        assert rel_err(getattr(layer, name), getattr(reference, name)) < 2e-2, name
    assert rel_err(layer.lora_A.grad, reference.lora_A.grad) < 2e-2


def test_op_ignores_autocast(emulated_extension):
    """Called inside an autocast region, the op's products keep its inputs' dtype (fp32 here), bit for bit."""
    ops = fused.FusedSeLoRAOps(emulated_extension)
    case = kp.random_case(2, 7, 24, 16, True, 3, torch.float32, device="cpu")
    plain = kp.run(ops.forward, ops.backward, case, "sample", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = kp.run(ops.forward, ops.backward, case, "sample", True)
    for name, a, b in zip(kp.NAMES, under_autocast, plain):
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_op_drives_a_selora_layer_like_the_reference(emulated_extension, monkeypatch, dtype):
    """A layer's whole path through the op as on a GPU: [N, T, in] inputs, autocast, Fisher terms
    accumulated over two backwards, then growth and another step at the new rank."""
    torch.manual_seed(8)
    reference = SeLoRALinear(nn.Linear(96, 136), alpha=2.0)
    nn.init.normal_(reference.lora_B, std=0.5)
    layers = {"reference": reference, "emulated": copy.deepcopy(reference)}
    offered = {"reference": None, "emulated": fused.FusedSeLoRAOps(emulated_extension)}
    x, target = torch.randn(4, 77, 96), torch.randn(4, 77, 136)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for _ in range(2):
        for name, layer in layers.items():
            monkeypatch.setattr(selora.fused, "selora_ops", lambda x, ops=offered[name]: ops)
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
