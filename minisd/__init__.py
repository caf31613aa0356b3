"""minisd: a compact Stable Diffusion 1.5 for SeLoRA fine-tuning on medical image–text data."""
from .config import CONFIGS, ModelConfig
from .errors import MinisdError
from .model import DEFAULT_MODEL, StableDiffusion, build, load

__all__ = ["CONFIGS", "DEFAULT_MODEL", "MinisdError", "ModelConfig", "StableDiffusion", "build", "load"]
