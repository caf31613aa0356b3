"""The chest-X-ray latent diffusion model, trained from scratch: 256×256 grayscale images, an 8-channel VAE,
a ≈40 M-parameter U-Net and a BERT text encoder (BioBERT). `minisd.load("cxr-ldm")` builds it with random
weights; `minisd.load(FOLDER)` reads a trained one."""
