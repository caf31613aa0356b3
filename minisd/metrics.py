"""Metrics of generated images: FID (as pytorch-fid computes it), KID, CLIP score, SSIM and PSNR.

Images are file paths or [3,H,W] tensors, uint8 or float in [0,1]. Problems with the numbers
(fewer images than feature dims, a singular covariance product, truncated prompts) are reported
with warnings.warn so that callers can record them.
"""

import hashlib
import math
import os
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

from minisd import image_files
from minisd.errors import MinisdError
from minisd.inception import DIMS, cache_dir, exact_fp32

IMAGE_EXTENSIONS = image_files.IMAGE_SUFFIXES
CLIP_MODEL = "ViT-L-14-quickgelu"
CLIP_WEIGHTS_URL = "https://huggingface.co/timm/vit_large_patch14_clip_224.openai"


# ---------------------------------------------------------------------------------------------- images

def list_images(folder):
    """The image files of `folder`, sorted by name; an error if there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MinisdError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise MinisdError(f"{folder}: no images ({' '.join(IMAGE_EXTENSIONS)})")
    return files


def load_image(path, window=None):
    """[3,H,W] uint8 (8-bit files, grayscale repeated) or float in [0,1] (16-bit files and DICOM films, read
    by minisd.image_files; `window` (center, width) replaces a film's VOI transform)."""
    try:
        if image_files.is_dicom(path):
            planes = image_files.read_dicom(path, window)
        else:
            with Image.open(path) as im:
                if reason := image_files.several_pages(im):
                    raise image_files.UnreadableImage(f"{path}: {reason}")
                im.load()
                if im.mode in image_files.WIDE:   # PIL's convert("RGB") would clip it to 255
                    planes = image_files.to_planes(im, path)
                else:
                    return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
    except image_files.UnreadableImage as e:
        raise MinisdError(str(e)) from None
    except Exception as e:
        raise MinisdError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    a = torch.from_numpy(np.stack(planes * (3 // len(planes))))
    return a.clamp(0, 1).contiguous()


def to_unit(image, window=None):
    """uint8 -> float32 / 255 (as torchvision's ToTensor); float images are returned as they are."""
    if isinstance(image, (str, Path)):
        image = load_image(image, window)
    if image.dtype == torch.uint8:
        return image.float().div(255)
    return image


def to_uint8(image, window=None):
    """[3,H,W] uint8, rounding floats to nearest as the PNGs minisd.images writes."""
    if isinstance(image, (str, Path)):
        image = load_image(image, window)
    if image.dtype == torch.uint8:
        return image
    return (image.float().clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8)


def content_hash(images):
    """sha256 over the bytes of the image files (or tensors), in order."""
    h = hashlib.sha256()
    for x in images:
        if isinstance(x, (str, Path)):
            h.update(Path(x).name.encode() + b"\0" + Path(x).read_bytes())
        else:
            x = x.detach().cpu().contiguous()
            h.update(f"{x.dtype}{tuple(x.shape)}".encode() + x.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- FID

def inception_features(model, images, dims=DIMS, batch_size=50, device="cpu", desc="inception", window=None):
    """{dim: float64 array [N, dim]} of the FID-Inception features of `images` (DICOM files read with `window`)."""
    dims = tuple(sorted(dims))
    feats = {d: [] for d in dims}
    with exact_fp32():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
            batch = [to_unit(x, window).to(device, torch.float32) for x in images[start:start + batch_size]]
            if len({tuple(x.shape) for x in batch}) > 1:
                # mixed sizes: resize each on its own (bilinear 299 -> 299 is then the identity)
                batch = [F.interpolate(x[None], size=(299, 299), mode="bilinear", align_corners=False)[0]
                         for x in batch]
            out = model(torch.stack(batch), dims=dims)
            for d in dims:
                feats[d].append(out[d].cpu().double().numpy())
    return {d: np.concatenate(feats[d]) for d in dims}


def cached_features(model, images, weights_sha256, resize_mode, dims=DIMS, batch_size=50, device="cpu",
                    desc="inception (real)", window=None):
    """inception_features, kept on disk under a key of image content + weights hash + resize mode + dims
    (+ the DICOM window, when one is given)."""
    key = hashlib.sha256("\n".join(
        [content_hash(images), weights_sha256, resize_mode, " ".join(map(str, sorted(dims)))]
        + ([f"window {window[0]!r} {window[1]!r}"] if window else [])).encode()).hexdigest()
    path = cache_dir() / "features" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as f:
            return {d: f[str(d)] for d in sorted(dims)}
    feats = inception_features(model, images, dims, batch_size, device, desc, window)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, **{str(d): f for d, f in feats.items()})
    os.replace(tmp, path)
    return feats


def activation_statistics(features):
    """Mean and covariance in float64, as pytorch-fid."""
    features = np.asarray(features, dtype=np.float64)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed exactly as pytorch-fid does.

    scipy.linalg.sqrtm is right in SciPy <= 1.11.1 and >= 1.13; 1.11.2 to 1.12.x return huge spurious
    imaginary parts (scipy gh-19415). `disp` is not passed: deprecated in 1.16, removed in 1.18.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape
    diff = mu1 - mu2

    def sqrtm(a):
        with warnings.catch_warnings():  # singular products are handled below, as pytorch-fid does
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            return linalg.sqrtm(a)

    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error may give a slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MinisdError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(S1 S2) with "
                              f"SciPy {scipy.__version__} (1.11.2 to 1.12.x are known to get this wrong)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(real_features, fake_features):
    """{dim: FID} from two {dim: [N, dim]} feature sets; None for a dim with fewer images than dims where
    the square root of the covariance product is not real."""
    out = {}
    for d in sorted(fake_features):
        n_real, n_fake = len(real_features[d]), len(fake_features[d])
        if min(n_real, n_fake) < 2:
            raise MinisdError(f"FID needs at least 2 images per set, got {n_real} real and {n_fake} generated")
        statistics = *activation_statistics(real_features[d]), *activation_statistics(fake_features[d])
        if min(n_real, n_fake) >= d:
            out[d] = frechet_distance(*statistics)
            continue
        warnings.warn(f"FID-{d}: {n_real} real / {n_fake} generated images, fewer than the {d} feature dims; "
                      f"the covariances are singular and the value is not comparable with published FIDs")
        try:
            out[d] = frechet_distance(*statistics)
        except MinisdError as e:  # sqrtm of a singular product can fail: this dim only goes unreported
            warnings.warn(f"FID-{d}: not computed ({e}); use at least {d} images per set")
            out[d] = None
    return out


# ---------------------------------------------------------------------------------------------- KID

def kid(real_features, fake_features, subset_size=1000, subsets=100, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with the kernel (x.y/d + 1)^3, over random subsets.

    Returns (mean, std) over the subsets (std with ddof=0, as torch-fidelity).
    """
    n = subset_size
    if n < 2 or n > min(len(real_features), len(fake_features)):
        raise MinisdError(f"--kid-subset-size {n}: must be between 2 and the number of images "
                          f"({len(real_features)} real, {len(fake_features)} generated)")
    x_all = np.asarray(real_features, dtype=np.float64)
    y_all = np.asarray(fake_features, dtype=np.float64)
    d = x_all.shape[1]
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        x = x_all[rng.choice(len(x_all), n, replace=False)]
        y = y_all[rng.choice(len(y_all), n, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (n * (n - 1)) - 2 * kxy.sum() / n ** 2
        mmds.append(mmd)
    return float(np.mean(mmds)), float(np.std(mmds))


# ---------------------------------------------------------------------------------------------- SSIM, PSNR

def gaussian_window(size=11, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, size=11, sigma=1.5):
    """Mean SSIM of two images in [0,1] (data range 1, K1 0.01, K2 0.03, 11x11 gaussian, sigma 1.5,
    valid windows only, per channel then averaged): torchmetrics' defaults, and skimage's with
    gaussian_weights=True, use_sample_covariance=False."""
    a, b = to_unit(a).double(), to_unit(b).double()
    if a.shape != b.shape:
        raise MinisdError(f"SSIM: image sizes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[-2:]) < size:
        raise MinisdError(f"SSIM: images of {tuple(a.shape[-2:])} px are smaller than the {size}x{size} window")
    c = a.shape[0]
    g = gaussian_window(size, sigma)
    kh, kw = g.view(1, 1, size, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, size).repeat(c, 1, 1, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x[None], kh, groups=c), kw, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def psnr(a, b):
    """PSNR in dB with data range 1; inf for identical images."""
    a, b = to_unit(a).double(), to_unit(b).double()
    if a.shape != b.shape:
        raise MinisdError(f"PSNR: image sizes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


# ---------------------------------------------------------------------------------------------- CLIP score

def load_clip(weights=None, device="cpu", model_name=None):
    """open_clip model (CLIP_MODEL unless `model_name`), its validation transform and its tokenizer.

    Weights: `weights` (a file), else OpenAI's from the cache folder, else downloaded into it.
    """
    import open_clip
    model_name = model_name or CLIP_MODEL
    if weights is not None:
        if not Path(weights).is_file():
            raise MinisdError(f"--clip-weights {weights}: no such file (want open_clip {model_name} OpenAI "
                              f"weights, e.g. open_clip_model.safetensors from {CLIP_WEIGHTS_URL})")
        pretrained = str(weights)
    else:
        pretrained = "openai"
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, cache_dir=str(cache_dir() / "open_clip"), device=device)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if weights is not None:
            raise MinisdError(f"--clip-weights {weights}: not open_clip {model_name} weights ({reason})") from None
        raise MinisdError(
            f"CLIP weights for {model_name} (OpenAI) are not in {cache_dir() / 'open_clip'} and could not be "
            f"downloaded ({reason}); get open_clip_model.safetensors from {CLIP_WEIGHTS_URL} "
            f"and pass --clip-weights PATH") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_weights_file(weights=None, model_name=None):
    """The file the CLIP weights were read from: `weights`, else open_clip's cached OpenAI download."""
    if weights is not None:
        return Path(weights)
    import open_clip
    config = open_clip.get_pretrained_cfg(model_name or CLIP_MODEL, "openai")
    return Path(open_clip.download_pretrained(config, cache_dir=str(cache_dir() / "open_clip")))


def clip_score(images, prompts, clip, batch_size=50, device="cpu"):
    """Per image 100 * max(cos(E_img, E_txt), 0) with the (model, preprocess, tokenizer) from load_clip.

    Returns {"scores": [...], "mean", "std" (ddof=0), "truncated": prompts cut to the context length}.
    """
    model, preprocess, tokenizer = clip
    if len(images) != len(prompts):
        raise MinisdError(f"CLIP score: {len(images)} images but {len(prompts)} prompts")
    context = tokenizer.context_length
    truncated = sum(len(tokenizer.encode(p)) + 2 > context for p in prompts)
    if truncated:
        warnings.warn(f"CLIP score: {truncated} of {len(prompts)} prompts are longer than {context} tokens "
                      f"and were truncated")
    scores = []
    with exact_fp32():
        for start in tqdm(range(0, len(images), batch_size), desc="clip score", unit="batch"):
            pil = [Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()) for x in images[start:start + batch_size]]
            pixels = torch.stack([preprocess(p) for p in pil]).to(device)
            tokens = tokenizer(list(prompts[start:start + batch_size])).to(device)
            e_img = F.normalize(model.encode_image(pixels).float(), dim=-1)
            e_txt = F.normalize(model.encode_text(tokens).float(), dim=-1)
            scores += (100 * (e_img * e_txt).sum(-1).clamp(min=0)).cpu().tolist()
    return {"scores": scores, "mean": float(np.mean(scores)), "std": float(np.std(scores)), "truncated": truncated}
