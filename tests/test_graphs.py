"""Captured steps compute what eager steps compute: the DDIM loop and the training step across SeLoRA growth.

Each check runs twice: on the CPU with capture and replay emulated (tests/emulated_graphs.py: replay re-runs
the recorded tensor operations only, as a CUDA graph does), and on a GPU with real CUDA graphs."""
import json

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
