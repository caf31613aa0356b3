"""DDPM noise schedules (SD-1.5's by default; a model names its own as `sd.schedule`) and DDIM sampling with
classifier-free guidance."""
import torch
from tqdm import tqdm

from .config import ScheduleConfig

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(schedule=ScheduleConfig()):
    """ᾱ_t, t = 0…999, of a "scaled_linear" (SD-1.5's) or "linear" β schedule (float64, kept as float32)."""
    if schedule.beta_schedule == "scaled_linear":
        betas = torch.linspace(schedule.beta_start ** 0.5, schedule.beta_end ** 0.5, NUM_TRAIN_TIMESTEPS, dtype=torch.float64) ** 2
    elif schedule.beta_schedule == "linear":
        betas = torch.linspace(schedule.beta_start, schedule.beta_end, NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta schedule {schedule.beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0).float()


def add_noise(latents, noise, t, ac=None):
    """q(z_t | z_0): the forward process used by training."""
    ac = (alphas_cumprod() if ac is None else ac).to(latents.device)[t].view(-1, 1, 1, 1).to(latents.dtype)
    return ac.sqrt() * latents + (1 - ac).sqrt() * noise


def ddim_timesteps(steps):
    """range(0, 1000, 1000 // steps) + 1, descending: 50 steps give 981, 961, …, 1."""
    if not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    return (torch.arange(steps) * (NUM_TRAIN_TIMESTEPS // steps) + 1).flip(0)


def ddim_step(latents, eps, t, t_prev, ac):
    """One deterministic (η = 0) DDIM update; ᾱ_prev = ᾱ_0 past the last step, no clipping."""
    a_t = ac[t]
    a_prev = ac[t_prev] if t_prev >= 0 else ac[0]
    x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def initial_latents(n, height, width, seed, channels=4):
    """Image i of a call starts from noise seeded with seed + i, drawn on the CPU, so it is reproducible
    alone, in any batch and on any device."""
    return torch.stack([torch.randn(channels, height // 8, width // 8, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


@torch.no_grad()
def ddim_sample(sd, prompts, negative_prompt="", steps=50, guidance=7.5, height=512, width=512, seed=0,
                batch_size=8, progress=True):
    """Generate one image per prompt -> float tensor [N, 3, H, W] in [0, 1] on the CPU."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device, dtype = sd.device, sd.dtype
    ac = alphas_cumprod(sd.schedule).to(device)
    timesteps = ddim_timesteps(steps).tolist()
    step_size = NUM_TRAIN_TIMESTEPS // steps
    all_latents = initial_latents(len(prompts), height, width, seed, channels=sd.config.vae.z_channels)
    images = []
    bar = tqdm(total=len(prompts) * steps, desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        cond = sd.text_encoder(sd.tokenizer(batch).to(device))
        guided = guidance != 1.0
        if guided:
            uncond = sd.text_encoder(sd.tokenizer([negative_prompt] * len(batch)).to(device))
            cond = torch.cat([uncond, cond])
        latents = all_latents[start:start + batch_size].to(device, torch.float32)
        for t in timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            eps = sd.unet(x.to(dtype), torch.full((x.shape[0],), t, device=device), cond).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = ddim_step(latents, eps, t, t - step_size, ac)
            bar.update(len(batch))
        image = sd.vae.decode((latents / sd.vae.scaling_factor).to(dtype)).float()
        images.append(((image + 1) / 2).clamp(0, 1).cpu())
    bar.close()
    return torch.cat(images)
