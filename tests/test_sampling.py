"""Schedule and DDIM equal diffusers' DDIMScheduler as SD-1.5 configures it."""
import pytest
import torch

from minisd.sampling import alphas_cumprod, ddim_step, ddim_timesteps, initial_latents, add_noise
from helpers import rel_err


@pytest.fixture(scope="module")
def scheduler():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                   steps_offset=1, prediction_type="epsilon")


def test_schedule_matches(scheduler):
    assert rel_err(alphas_cumprod(), scheduler.alphas_cumprod) < 1e-5


@pytest.mark.parametrize("steps", [50, 20, 7, 1000])
def test_timesteps_match(scheduler, steps):
    scheduler.set_timesteps(steps)
    assert ddim_timesteps(steps).tolist() == scheduler.timesteps.tolist()
    if steps == 50:
        assert ddim_timesteps(50)[0] == 981 and ddim_timesteps(50)[-1] == 1


@pytest.mark.parametrize("steps", [50, 7])
def test_every_update_matches(scheduler, steps):
    scheduler.set_timesteps(steps)
    ac = alphas_cumprod()
    g = torch.Generator().manual_seed(steps)
    ours = theirs = torch.randn(2, 4, 8, 8, generator=g)
    for t in scheduler.timesteps:
        eps = torch.randn(2, 4, 8, 8, generator=g)
        theirs = scheduler.step(eps, t, theirs, eta=0.0).prev_sample
        ours = ddim_step(ours, eps, int(t), int(t) - 1000 // steps, ac)
        assert rel_err(ours, theirs) < 1e-5


def test_add_noise_matches(scheduler):
    g = torch.Generator().manual_seed(0)
    x, noise, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g), torch.tensor([0, 500, 999])
    assert rel_err(add_noise(x, noise, t), scheduler.add_noise(x, noise, t)) < 1e-5


def test_initial_noise_does_not_depend_on_batching():
    both = initial_latents(2, 64, 64, seed=5)
    assert torch.equal(both[1], initial_latents(1, 64, 64, seed=6)[0])


def test_guided_sampling_is_seeded_and_batch_independent():
    import minisd
    from minisd.sampling import ddim_sample
    sd = minisd.load("tiny")
    a = ddim_sample(sd, ["a", "b"], steps=3, height=32, width=32, seed=3, batch_size=2, progress=False)
    b = ddim_sample(sd, ["b"], steps=3, height=32, width=32, seed=4, batch_size=1, progress=False)
    assert a.shape == (2, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert rel_err(a[1], b[0]) < 1e-5


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_images_equal_the_diffusers_pipeline(tmp_path, guidance):
    """Text to image end to end: the same weights, prompt and seed give diffusers' StableDiffusionPipeline image."""
    diffusers = pytest.importorskip("diffusers")
    from minisd.checkpoint.writing import save_diffusers
    from minisd.sampling import ddim_sample
    from helpers import random_model
    sd = random_model("tiny")
    save_diffusers(sd, str(tmp_path))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt = "frontal chest x-ray, small right pleural effusion"
    with torch.no_grad():
        theirs = pipe(prompt, num_inference_steps=4, guidance_scale=guidance, height=64, width=48,
                      generator=torch.Generator().manual_seed(11), output_type="pt").images
    ours = ddim_sample(sd, [prompt], steps=4, guidance=guidance, height=64, width=48, seed=11, progress=False)
    assert ours.shape == theirs.shape == (1, 3, 64, 48)
    assert rel_err(ours, theirs) < 1e-4
