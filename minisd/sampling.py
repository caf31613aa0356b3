"""DDPM noise schedules (SD-1.5's by default; a model names its own as `sd.schedule`) and DDIM sampling with
classifier-free guidance."""
import torch
from tqdm import tqdm

from .config import ScheduleConfig
from .graphs import Replayer

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
    return ddim_update(latents, eps, ac[t], ac[t_prev] if t_prev >= 0 else ac[0])


def ddim_update(latents, eps, a_t, a_prev):
    """The DDIM update for ᾱ_t = a_t and ᾱ_prev = a_prev (tensors, so that they can live on the device)."""
    x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def initial_latents(n, height, width, seed, channels=4):
    """Image i of a call starts from noise seeded with seed + i, drawn on the CPU, so it is reproducible
    alone, in any batch and on any device."""
    return torch.stack([torch.randn(channels, height // 8, width // 8, generator=torch.Generator().manual_seed(seed + i))
                        for i in range(n)])


class DenoisingLoop:
    """DDIM with classifier-free guidance (unconditional and conditional halves in one U-Net batch), one
    step per call. The step's index, timestep and ᾱ's are read from device tensors and the latents and
    text context live in fixed buffers, so every step launches the same kernels: on a GPU the step is
    captured once as a CUDA graph and replayed (minisd.graphs), elsewhere it runs eagerly."""

    def __init__(self, sd, n, latent_shape, context, steps, guidance, graphs=True):
        device = sd.device
        ac = alphas_cumprod(sd.schedule).to(device)
        timesteps = ddim_timesteps(steps).to(device)
        self.sd, self.guidance, self.dtype = sd, guidance, sd.dtype
        self.timesteps = timesteps
        self.a_t, self.a_prev = ac[timesteps], ac[(timesteps - NUM_TRAIN_TIMESTEPS // steps).clamp(min=0)]
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.latents = torch.zeros(n, *latent_shape, device=device)
        self.context = torch.zeros_like(context)
        # the caller's autocast, without its weight cache: a capture must cast inside the graph
        kind = device.type
        self.autocast = dict(device_type=kind, dtype=torch.get_autocast_dtype(kind),
                             enabled=torch.is_autocast_enabled(kind), cache_enabled=False)
        self.replayer = Replayer(self.step_now, device, name="denoising step") if graphs else None

    def start(self, latents, context):
        self.latents.copy_(latents)
        self.context.copy_(context)
        self.index.zero_()

    def step_now(self):
        with torch.autocast(**self.autocast):
            latents, guided = self.latents, self.guidance != 1.0
            x = torch.cat([latents, latents]) if guided else latents
            t = self.timesteps.index_select(0, self.index).expand(x.shape[0])
            eps = self.sd.unet(x.to(self.dtype), t, self.context).float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self.guidance * (eps_c - eps_u)
            a_t, a_prev = self.a_t.index_select(0, self.index), self.a_prev.index_select(0, self.index)
            self.latents.copy_(ddim_update(latents, eps, a_t, a_prev))
            self.index += 1

    def step(self):
        if self.replayer is None:
            self.step_now()
        else:
            self.replayer(key=0)


@torch.no_grad()
def ddim_sample(sd, prompts, negative_prompt="", steps=50, guidance=7.5, height=512, width=512, seed=0,
                batch_size=8, progress=True, graphs=True):
    """Generate one image per prompt -> float tensor [N, 3, H, W] in [0, 1] on the CPU. `graphs=False`
    keeps a GPU from capturing the denoising step (the result is the same)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device, dtype = sd.device, sd.dtype
    all_latents = initial_latents(len(prompts), height, width, seed, channels=sd.config.vae.z_channels)
    images, loop = [], None
    bar = tqdm(total=len(prompts) * steps, desc="sampling", unit="step", disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        context = sd.text_encoder(sd.tokenizer(batch).to(device))
        if guidance != 1.0:
            uncond = sd.text_encoder(sd.tokenizer([negative_prompt] * len(batch)).to(device))
            context = torch.cat([uncond, context])
        latents = all_latents[start:start + batch_size].to(device, torch.float32)
        if loop is None or loop.latents.shape != latents.shape:
            loop = DenoisingLoop(sd, len(batch), latents.shape[1:], context, steps, guidance, graphs)
        loop.start(latents, context)
        for _ in range(steps):
            loop.step()
            bar.update(len(batch))
        image = sd.vae.decode((loop.latents / sd.vae.scaling_factor).to(dtype)).float()
        images.append(((image + 1) / 2).clamp(0, 1).cpu())
    bar.close()
    return torch.cat(images)
