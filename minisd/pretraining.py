"""Training the chest-X-ray LDM from scratch, in two stages, on the fine-tuning loop's machinery (the run folder,
batch plan, random draws, mixed precision, accumulation, processes, validation schedule, checkpoints, resume):

    --stage vae    the VAE, L_recon + kl_weight · KL; validated by the same loss, reconstruction MSE and SSIM,
                   and it measures the latents' scaling factor; keeps the best VAE as vae/
    --stage unet   the U-Net, and BERT's pooler and last LayerNorms, on a trained VAE's latents: ε-MSE with a
                   share of prompts dropped for classifier-free guidance; keeps the best model as model/

Both use AdamW with a cosine learning rate from --lr to --lr-end over the run and, with --ema DECAY, an
exponential moving average of the weights, which validation and the written files then use. The best by
validation loss is kept (vae/, model/), the last written at the end (vae_last/, model_last/).
"""
import contextlib
import hashlib
import math
import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from .checkpoint.cxr import save_cxr_folder, save_part
from .cxr.model import load, use_vae
from .errors import MinisdError
from .files import atomic_folder
from .measures import parameter_counts
from .metrics import ssim
from .training import Trainer


def cosine_lr(step, total, start, end):
    """The learning rate of optimizer step `step` (1-based) of `total`: `start` at the first, `end` at the last."""
    progress = (step - 1) / max(total - 1, 1)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def frozen_fingerprint(sd):
    """sha256 over the names, shapes and the signs of 64 values of every weight that does not train: what a
    resumed run must find again (the VAE under a U-Net, the text encoder's frozen layers)."""
    h = hashlib.sha256()
    for name, p in sd.named_parameters():
        if not p.requires_grad:
            w = p.detach().flatten()
            h.update(f"{name}:{list(p.shape)}:".encode())
            h.update(w[torch.linspace(0, w.numel() - 1, 64, device=w.device).long()].signbit().cpu().numpy().tobytes())
    return h.hexdigest()


class EMA:
    """An exponential moving average of parameters, as LDM's LitEma: update n uses min(decay, (1 + n) / (10 + n)),
    so that the average does not start as a long memory of the random initialisation."""

    def __init__(self, params, decay):
        self.params, self.decay, self.updates = params, decay, 0
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.shadow.values()), [p.detach() for p in self.params.values()], 1 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self):
        """The averaged weights in the model for the block, the trained ones back after it."""
        trained = {name: p.detach().clone() for name, p in self.params.items()}
        for name, p in self.params.items():
            p.copy_(self.shadow[name])
        try:
            yield
        finally:
            for name, p in self.params.items():
                p.copy_(trained[name])

    def state_dict(self):
        return {"updates": self.updates, "shadow": {name: t.cpu() for name, t in self.shadow.items()}}

    def load_state_dict(self, state, path):
        shadow = state.get("shadow") if isinstance(state, dict) else None
        if not isinstance(shadow, dict) or shadow.keys() != self.shadow.keys() or \
                any(shadow[k].shape != v.shape for k, v in self.shadow.items()):
            raise MinisdError(f"--resume: {path}: its weight average (--ema) does not fit this run's weights")
        self.updates = state["updates"]
        for name, value in shadow.items():
            self.shadow[name].copy_(value)


class StageTrainer(Trainer):
    """What both stages share: a part trained in full, AdamW on a cosine schedule, the optional average, and
    model folders as outputs. A stage names its `output` folder and defines `build()` and `trained()`."""

    output = None

    def setup_model(self):
        a = self.args
        self.sd = self.build()
        self.layers, self.trained_params = {}, self.trained()
        for p in self.trained_params.values():
            p.requires_grad_(True)
        self.sd.set_gradient_checkpointing(a.grad_checkpointing)
        self.fingerprint = frozen_fingerprint(self.sd)
        self.ema = EMA(self.trained_params, a.ema) if a.ema else None

    def setup_optimizer(self):
        a = self.args
        self.optimizer = torch.optim.AdamW(self.params, lr=a.lr, weight_decay=a.weight_decay,
                                           fused=self.device.startswith("cuda"))   # one kernel for all weights
        self.controller = None

    def description(self):
        a = self.args
        n = sum(p.numel() for p in self.trained_params.values())
        ema = f", EMA {a.ema}" if a.ema else ""
        return (f"{a.model} {a.stage} from scratch: {n:,} trained parameters, AdamW (weight decay {a.weight_decay}), "
                f"lr {a.lr:g} → {a.lr_end:g} cosine{ema}")

    def step_fields(self):
        return {}

    def shown_fields(self):
        return {"lr": f"{self.optimizer.param_groups[0]['lr']:.2e}"}

    def train_step(self, batches):
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.step + 1, self.total_steps, self.args.lr, self.args.lr_end)
        loss, events = super().train_step(batches)
        if self.ema is not None:
            self.ema.update()
        return loss, events

    def averaged(self):
        """The weights validation and the written files use: the average with --ema, else the trained ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def end_of_validation_period(self):
        with self.averaged():
            return super().end_of_validation_period()

    def extra_state(self):
        return {"ema": self.ema.state_dict() if self.ema is not None else None}

    def load_extra_state(self, state, path):
        if self.ema is not None:
            self.ema.load_state_dict(state.get("ema"), path)

    # ----------------------------------------------------------------------------------- files

    def write(self, name):
        """The trained part as the folder `name` in the run folder, replacing it whole."""
        atomic_folder(self.run.file(name), self.write_output)

    def record(self, val_loss, output=None, kind=""):
        parts = ("vae",) if self.args.stage == "vae" else ("unet", "text_encoder")
        return {"model": output, "step": self.step, "val_loss": val_loss,
                "parameters": parameter_counts(self.sd, parts), **self.val_fields}

    def save_best(self, val_loss):
        self.write(self.output)
        self.measures.best = self.record(val_loss, self.output)

    def finish(self, val_loss):
        with self.averaged():
            self.write(self.output + "_last")
            if not os.path.isdir(self.run.file(self.output)):
                self.save_best(val_loss)
            self.write_summary(self.record(val_loss, self.output + "_last"), finished=True)
        best = f"{self.best_val:.4g}" if self.best_val < math.inf else "n/a"
        print(f"done: {self.run.file(self.output)} (best validation loss {best}); {self.next_step()}")


class VAETrainer(StageTrainer):
    """--stage vae: the VAE alone (the U-Net and the text encoder are built, but neither trains nor runs)."""

    output = "vae"
    LOSS = "reconstruction MSE + KL weight × KL"
    READS_TEXT = False

    def build(self):
        return load(self.args.model, self.device, torch.float32, seed=self.args.seed)

    def trained(self):
        return {name: p for name, p in self.sd.named_parameters() if name.startswith("vae.")}

    def draws(self, shape):
        """A micro-batch's noise of the latent sample, sliced to this process."""
        noise = torch.randn(self.global_batch, *shape, generator=self.generator)
        lo = self.rank * self.args.batch_size
        return {"latent": noise[lo:lo + self.args.batch_size]}

    def terms(self, images, noise):
        """(reconstruction MSE, KL to N(0, I), posterior mean, latent sample) of images in [-1, 1]; MSE and KL are
        means over entries, so that the KL weight does not depend on the resolution."""
        with self.autocast_ctx():
            mean, logvar = self.sd.vae.encode(images)
        mean, logvar = mean.float(), logvar.float()
        z = mean + (0.5 * logvar).exp() * noise
        with self.autocast_ctx():
            reconstruction = self.sd.vae.decoder(z)
        recon = F.mse_loss(reconstruction.float(), images.mean(dim=1, keepdim=True))
        kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
        return recon, kl, mean, z

    def loss(self, batch, draws, with_grad=True):
        with torch.set_grad_enabled(with_grad):
            recon, kl, _, _ = self.terms(batch["images"], draws["latent"])
        return recon + self.args.kl_weight * kl

    @torch.no_grad()
    def validate(self):
        """The loss, reconstruction MSE, KL and SSIM (of the reconstruction of the posterior mean, against the
        grey original) over the first --val-max validation images with fixed noise; the scaling factor
        1 / std of their latents; a grid of originals above their reconstructions. Without a validation split
        the first training images are measured (for the scaling factor), and there is no validation loss."""
        a = self.args
        source = self.val_set if self.val_set is not None else self.train_set
        n = min(len(source), a.val_max or len(source))
        g = torch.Generator().manual_seed(a.seed + 1)
        shape = (self.sd.config.vae.z_channels, a.resolution // 8, a.resolution // 8)
        totals = dict.fromkeys(("loss", "recon", "kl", "ssim"), 0.0)
        moments, shown = torch.zeros(2, dtype=torch.float64), []
        for start in range(0, n, a.batch_size):
            items = [source[i] for i in range(start, min(n, start + a.batch_size))]
            images = torch.stack([it["image"] for it in items]).to(self.device)
            recon, kl, mean, z = self.terms(images, torch.randn(len(items), *shape, generator=g).to(self.device))
            with self.autocast_ctx():
                decoded = self.sd.vae.decoder(mean)
            decoded = ((decoded.float() + 1) / 2).clamp(0, 1).cpu()
            originals = ((images.mean(dim=1, keepdim=True) + 1) / 2).cpu()
            for key, value in (("loss", recon + a.kl_weight * kl), ("recon", recon), ("kl", kl)):
                totals[key] += value.item() * len(items)
            totals["ssim"] += sum(ssim(x, y) for x, y in zip(originals, decoded))
            moments += torch.stack([z.double().mean(), z.double().square().mean()]).cpu() * len(items)
            shown += list(zip(originals, decoded, (it["prompt"] for it in items)))[:a.val_images - len(shown)]
        mean, square = (moments / n).tolist()
        scale = 1 / math.sqrt(max(square - mean * mean, 1e-12))
        self.sd.vae.scaling_factor = scale
        self.sd.config = replace(self.sd.config, vae=replace(self.sd.config.vae, scaling_factor=scale))
        self.val_fields = {key: totals[key] / n for key in ("recon", "kl", "ssim")}
        self.val_fields.update(scaling_factor=scale, measured_on=f"{n} {source.split} images")
        if shown:
            grid = torch.cat([torch.stack([x for x, _, _ in shown]), torch.stack([y for _, y, _ in shown])])
            captions = [prompt for _, _, prompt in shown] + ["reconstruction"] * len(shown)
            self.run.save_samples(grid.expand(-1, 3, -1, -1), captions, self.step, columns=len(shown))
        return totals["loss"] / n if self.val_set is not None else None

    def write_output(self, folder):
        save_part(self.sd, "vae", folder)

    def next_step(self):
        return (f"train the U-Net on it with: python train.py --model {self.args.model} --stage unet "
                f"--vae {self.run.path} --data {self.args.data} ...")


class UNetTrainer(StageTrainer):
    """--stage unet: the U-Net and the text encoder's trained part on the latents of the --vae VAE, which the run
    keeps a copy of (its vae/ folder, what --resume reads)."""

    output = "model"

    def build(self):
        a = self.args
        sd = load(a.model, self.device, torch.float32, text_encoder=a.text_encoder, seed=a.seed)
        use_vae(sd, self.run.file("vae") if self.resume else a.vae)
        sd.config = replace(sd.config, unet=replace(sd.config.unet, sample_size=a.resolution // 8))
        return sd

    def trained(self):
        text = {f"text_encoder.{name}": p for name, p in self.sd.text_encoder.trained_parameters().items()}
        return {**{name: p for name, p in self.sd.named_parameters() if name.startswith("unet.")}, **text}

    def write_manifests(self):
        super().write_manifests()
        if not self.resume:
            atomic_folder(self.run.file("vae"), lambda folder: save_part(self.sd, "vae", folder))

    def write_output(self, folder):
        save_cxr_folder(self.sd, folder)

    def next_step(self):
        return (f"sample with: python sample.py --model {self.run.file('model')} --prompt ...; fine-tune with: "
                f"python train.py --model {self.run.file('model')} --method selora --data {self.args.data} ...")


TRAINERS = {"vae": VAETrainer, "unet": UNetTrainer}
