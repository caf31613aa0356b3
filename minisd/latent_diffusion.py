"""What every model family shares with sampling, training and the adapters: a tokenizer, a text encoder, a
U-Net and a VAE (`parts()` for the three networks), and the noise schedule it was trained with."""
import torch.nn as nn


class LatentDiffusion(nn.Module):
    """A family sets self.config (with .schedule), self.unet, self.vae, self.text_encoder, self.tokenizer."""

    def parts(self):
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def schedule(self):
        """The noise schedule the model was trained with; sampling and training use it."""
        return self.config.schedule

    @property
    def device(self):
        return next(self.vae.parameters()).device   # the VAE is never adapted: its weights are the model's

    @property
    def dtype(self):
        return next(self.vae.parameters()).dtype
