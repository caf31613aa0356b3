"""Captured steps compute what eager steps compute: the DDIM loop and the training step across SeLoRA growth.

Each check runs twice: on the CPU with capture and replay emulated (tests/emulated_graphs.py: replay re-runs
the recorded tensor operations only, as a CUDA graph does), and on a GPU with real CUDA graphs."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import minisd
from minisd import graphs
from minisd.sampling import alphas_cumprod, ddim_step, ddim_timesteps, initial_latents
from emulated_graphs import EmulatedGraphs
from helpers import load_script, random_model, rel_err

BACKENDS = ["emulated", pytest.param("cuda", marks=pytest.mark.cuda)]


class CountingCudaGraphs(graphs.CudaGraphs):
    def __init__(self):
        super().__init__()
        self.captured = 0

    def capture(self, fn):
        out = super().capture(fn)
        self.captured += 1
        return out


@pytest.fixture
def backend(request, monkeypatch):
    """(device, a graphs backend that counts its captures) installed as minisd.graphs.BACKEND."""
    if request.param == "emulated":
        chosen, device = EmulatedGraphs(), "cpu"
    else:
        chosen, device = CountingCudaGraphs(), "cuda"
    monkeypatch.setattr(graphs, "BACKEND", chosen)
    return device, chosen


def eager_ddim(sd, prompts, steps, guidance, height, width, seed):
    """The plain loop: a Python timestep per step, the update with host-side ᾱ's, CFG in one batch."""
    ac = alphas_cumprod().to(sd.device)
    latents = initial_latents(len(prompts), height, width, seed).to(sd.device)
    context = torch.cat([sd.text_encoder(sd.tokenizer([""] * len(prompts))), sd.text_encoder(sd.tokenizer(prompts))])
    for t in ddim_timesteps(steps).tolist():
        eps = sd.unet(torch.cat([latents, latents]), torch.full((2 * len(prompts),), t, device=sd.device), context)
        eps_u, eps_c = eps.chunk(2)
        latents = ddim_step(latents, eps_u + guidance * (eps_c - eps_u), t, t - 1000 // steps, ac)
    return ((sd.vae.decode(latents / sd.vae.scaling_factor) + 1) / 2).clamp(0, 1).cpu()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@torch.no_grad()
def test_denoising_loop_gives_the_eager_loops_image(backend):
    device, chosen = backend
    sd = random_model("tiny").to(device)
    prompts, kwargs = ["frontal chest x-ray", "small left effusion"], dict(steps=4, height=48, width=32, seed=3)
    reference = eager_ddim(sd, prompts, guidance=7.5, **kwargs)
    eager = minisd.sampling.ddim_sample(sd, prompts, progress=False, graphs=False, **kwargs)
    captured = minisd.sampling.ddim_sample(sd, prompts, progress=False, **kwargs)
    assert chosen.captured == 1   # step 1 eager (the warm-up), then one capture replayed for steps 2-4
    if device == "cpu":
        assert torch.equal(eager, reference) and torch.equal(captured, reference)
    else:   # the same kernels; cuBLAS may pick another algorithm inside a capture
        assert rel_err(eager, reference) < 1e-5 and rel_err(captured, reference) < 1e-4


def train(monkeypatch, cwd, name, capture, device):
    """train.py in this process with captured or eager steps; returns the Trainer, the step losses and the
    final adapter."""
    from minisd import training
    trainers, fit = [], training.Trainer.fit

    def spy(self):
        trainers.append(self)
        if not capture:
            self.replayer.enabled = False
        return fit(self)

    monkeypatch.setattr(training.Trainer, "fit", spy)
    monkeypatch.chdir(cwd)
    # tests at steps 4 and 8, Fisher tracked at steps 3-4 and 7-8, every layer grows at each test (λ = 1)
    load_script("train.py").main(["--model", "tiny", "--data", "phantom", "--resolution", "32", "--batch-size", "2",
                                  "--max-steps", "8", "--expand-every", "4", "--fisher-window", "2", "--lambda", "1",
                                  "--val-max", "2", "--val-images", "0", "--device", device, "--run-name", name])
    with open(cwd / "runs" / name / "log.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return trainers[0], losses, load_file(cwd / "runs" / name / "adapter_last.safetensors")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.filterwarnings("ignore:--lambda 1")
def test_captured_training_step_equals_eager_across_growth(backend, tmp_path, monkeypatch):
    device, chosen = backend
    trainer, losses, adapter = train(monkeypatch, tmp_path, "captured", True, device)
    _, eager_losses, eager_adapter = train(monkeypatch, tmp_path, "eager", False, device)
    # eager: steps 1 and 2 (Adam's state appears in step 1), 3, 5 and 7 (warm-ups after a change of key);
    # captured: step 6 without Fisher terms, 4 and 8 with them (before and after a growth)
    assert chosen.captured == 3 and trainer.replayer.replays == 3
    assert trainer.total_rank() > 2 * len(trainer.layers)   # grew at both tests
    tolerance = 0 if device == "cpu" else 1e-5
    assert losses == pytest.approx(eager_losses, rel=tolerance, abs=0)
    assert adapter.keys() == eager_adapter.keys()
    for name, value in adapter.items():
        assert value.shape == eager_adapter[name].shape, name
        assert rel_err(value, eager_adapter[name]) <= 10 * tolerance, name


def test_a_failed_capture_runs_eagerly_and_is_not_tried_again(monkeypatch):
    """A step that synchronises with the host cannot be captured: it runs eagerly, with one warning, and later
    Replayers of the same step (a new denoising loop per sampling call) do not try again."""
    chosen = EmulatedGraphs()
    monkeypatch.setattr(graphs, "BACKEND", chosen)
    x = torch.arange(3.0)

    def step():
        return x * 2 if x.sum().item() > 0 else x

    with pytest.warns(RuntimeWarning, match="capture of the denoising step failed"):
        first = graphs.Replayer(step, "cpu", name="denoising step")
        assert all(torch.equal(first(key=0), x * 2) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = graphs.Replayer(step, "cpu", name="denoising step")
        assert all(torch.equal(second(key=0), x * 2) for _ in range(3))
    other = graphs.Replayer(lambda: x * 3, "cpu", name="training step")
    assert all(torch.equal(other(key=0), x * 3) for _ in range(3))
    assert chosen.captured == 1 and other.replays == 2   # only the step that can be captured


FAILED_CAPTURE = """
import sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
from minisd import graphs
x = torch.arange(3.0, device="cuda")
failing = graphs.Replayer(lambda: x * 2 if x.sum().item() > 0 else x, "cuda", name="failing step")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert all(torch.equal(failing(key=0), x * 2) for _ in range(3))
assert any("capture of the failing step failed" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the capture stream is still current"
torch.cuda.empty_cache()   # raises while the allocator believes a capture is under way
torch.randn(3, device="cuda")   # raises while the generator believes it is being captured
y = torch.zeros(3, device="cuda")
other = graphs.Replayer(lambda: y.add_(1), "cuda", name="other step")
for _ in range(3):
    other(key=0)
torch.cuda.synchronize()
assert other.captures == 1 and torch.equal(y, torch.full_like(y, 3)), y
print("ok")
"""


@pytest.mark.cuda
def test_a_failed_capture_leaves_cuda_usable():
    """A capture that fails inside torch.cuda.graph (here, a host synchronisation) leaves the default stream
    current, and the allocator and the random generator usable: empty_cache(), random draws on the GPU and later
    captures work. In a process of its own: were it not so, the rest of the process would see it broken."""
    import subprocess
    import sys
    from helpers import ROOT
    done = subprocess.run([sys.executable, "-c", FAILED_CAPTURE, ROOT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
