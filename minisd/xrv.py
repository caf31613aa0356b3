"""Chest-X-ray features for FID and KID: torchxrayvision's DenseNet-121 (`densenet121-res224-all`), its
penultimate 1024-d features (the last norm, ReLU, global average pool: the model's `features2`).

The preprocessing is torchxrayvision's own, reproduced with scipy: an image in [0, 1] becomes
(2x - 1) * 1024 (`xrv.utils.normalize`), its channels are averaged into one (the README's recipe), it is
centre-cropped to a square (`XRayCenterCrop`) and resized to 224 (`XRayResizer`, i.e. skimage's resize:
a Gaussian of sigma (s - 1) / 2 when shrinking by s, bilinear zoom, constant-0 borders, then clipped to the
input's range). The network is torchvision's DenseNet-121 with a one-channel stem, as torchxrayvision's.
"""
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage
from tqdm import tqdm

from .checkpoint.files import PICKLE_SUFFIXES, read_tensors
from .errors import MinisdError
from .inception import cache_dir, exact_fp32, load_exactly, sha256_file
from .metrics import to_unit
from .pickled_model import read_pickled_model

WEIGHTS_FILE = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
WEIGHTS_URL = "https://github.com/mlmed/torchxrayvision/releases/download/v1/" + WEIGHTS_FILE
SIZE = 224
DIMS = 1024
FEATURES = "torchxrayvision densenet121-res224-all: 1024-d penultimate features, 1 channel, 224 px, [-1024, 1024]"


class XRVDenseNet(nn.Module):
    """DenseNet-121 features of a [N, 1, 224, 224] batch in [-1024, 1024]; parameter names as torchxrayvision's."""

    def __init__(self):
        super().__init__()
        from torchvision.models import DenseNet
        self.features = DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64).features
        self.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.features(x)), 1).flatten(1)


def preprocess(image, window=None):
    """[1, 224, 224] float32 array in [-1024, 1024] from an image file or a [3, H, W] tensor in [0, 1]."""
    pixels = to_unit(image, window).float().numpy()
    grey = ((2 * pixels - 1) * 1024).mean(0)
    height, width = grey.shape
    crop = min(height, width)
    top, left = height // 2 - crop // 2, width // 2 - crop // 2
    return skimage_resize(grey[None, top:top + crop, left:left + crop], (1, SIZE, SIZE))


def skimage_resize(image, shape):
    """skimage.transform.resize(image, shape, mode="constant", preserve_range=True) on a float32 array."""
    factors = np.divide(image.shape, shape)
    if any(out < size for out, size in zip(shape, image.shape)):   # anti-aliasing, when shrinking
        image_filtered = ndimage.gaussian_filter(image, np.maximum(0, (factors - 1) / 2), cval=0, mode="grid-constant")
    else:
        image_filtered = image
    out = ndimage.zoom(image_filtered, [1 / f for f in factors], order=1, mode="grid-constant", cval=0, grid_mode=True)
    low, high = image.min(), image.max()
    if not low <= 0 <= high and out.min() <= 0 <= out.max():   # the border value joins the clipping range
        low, high = min(low, 0), max(high, 0)
    return np.clip(out, low, high)


def features(net, images, batch_size=50, device="cpu", window=None, desc="xrv features"):
    """float64 array [N, 1024] of the features of `images` (files or [3, H, W] tensors in [0, 1] or uint8)."""
    out = []
    with exact_fp32():
        for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
            batch = np.stack([preprocess(x, window) for x in images[start:start + batch_size]])
            out.append(net(torch.from_numpy(batch).to(device)).cpu().double().numpy())
    return np.concatenate(out)


def weights_path(path=None):
    """--xrv-weights, else the file in minisd's or torchxrayvision's cache, else downloaded into minisd's."""
    if path is not None:
        if not Path(path).is_file():
            raise MinisdError(f"--xrv-weights {path}: no such file (want torchxrayvision's densenet121-res224-all "
                              f"weights, {WEIGHTS_FILE} from {WEIGHTS_URL})")
        return Path(path)
    cached = cache_dir() / "xrv" / WEIGHTS_FILE
    for candidate in (cached, Path.home() / ".torchxrayvision" / "models_data" / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
    except (OSError, urllib.error.URLError, RuntimeError) as e:
        raise MinisdError(f"torchxrayvision weights {WEIGHTS_FILE} are not in {cached.parent} and could not be "
                          f"downloaded ({type(e).__name__}: {e}); get {WEIGHTS_URL} and pass --xrv-weights PATH") from None
    return cached


def load_xrv(path=None, device="cpu"):
    """The network with the weights at `path` (torchxrayvision's released file, a whole pickled model read as
    data, or a state dict as .safetensors/.pt), in eval mode; returns (network, weights file)."""
    path = weights_path(path)
    state = read_pickled_model(path) if str(path).lower().endswith(PICKLE_SUFFIXES) else None
    state = read_tensors(str(path)) if state is None else state
    net = XRVDenseNet()
    state = {k: v for k, v in state.items() if k.startswith("features.")}   # the classifier is not used
    load_exactly(net, state, path, "torchxrayvision's densenet121 weights")
    return net.to(device=device, dtype=torch.float32).eval(), path


def weights_record(path):
    return {"path": str(path), "sha256": sha256_file(path), "features": FEATURES}
