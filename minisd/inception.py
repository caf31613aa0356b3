"""The FID-Inception network: pytorch-fid's InceptionV3 with the TF 2015-12-05 weights.

One forward pass gives all four feature sets FID is computed on: the first max-pool (64),
the second max-pool (192), the input of the aux classifier (768) and the final avg-pool (2048).
Parameter names are those of `pt_inception-2015-12-05-6726825d.pth`, so that file loads as is.
"""

import contextlib
import hashlib
import os
import urllib.error
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minisd.checkpoint.files import read_tensors
from minisd.errors import MinisdError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes
DIMS = (64, 192, 768, 2048)
RESIZE_MODE = "bilinear to 299x299, align_corners=False, no antialias, then [0,1] -> [-1,1]"


def cache_dir():
    """Where downloaded weights and cached features live: $MINISD_CACHE, else ~/.cache/minisd."""
    return Path(os.environ.get("MINISD_CACHE") or Path.home() / ".cache" / "minisd")


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    # TensorFlow's average pool does not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Mixed_7b pools with TF's average pool; Mixed_7c with a max pool, as the TF graph does."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


class FIDInception(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.eval()

    def forward(self, x, dims=DIMS):
        """Images [B,3,H,W] in [0,1] -> {dim: features [B, dim]} for each of `dims`, from one pass."""
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        stages = [
            ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool"],
            ["Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool"],
            ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
            ["Mixed_7a", "Mixed_7b", "Mixed_7c"],
        ]
        out = {}
        for dim, names in zip(DIMS, stages):
            if dim > max(dims):
                break
            for name in names:
                x = F.max_pool2d(x, kernel_size=3, stride=2) if name == "maxpool" else getattr(self, name)(x)
            if dim in dims:
                out[dim] = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return out


@contextlib.contextmanager
def exact_fp32():
    """fp32 without TF32 and without autocast, so that features do not depend on the batch size."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False), torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def download(url, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(dst), hash_prefix=WEIGHTS_SHA256, progress=True)


def weights_path(path=None):
    """The weights file: `path` if given, else the cache folder, else downloaded into it."""
    if path is not None:
        if not Path(path).is_file():
            raise MinisdError(f"--inception-weights {path}: no such file (want {WEIGHTS_FILE} from {WEIGHTS_URL})")
        return Path(path)
    cached = cache_dir() / WEIGHTS_FILE
    if cached.is_file():
        return cached
    try:
        download(WEIGHTS_URL, cached)
    except (OSError, urllib.error.URLError, RuntimeError) as e:
        raise MinisdError(
            f"FID Inception weights {WEIGHTS_FILE} are not in {cached.parent} and could not be downloaded "
            f"({type(e).__name__}: {e}); get {WEIGHTS_URL} and pass --inception-weights PATH "
            f"or put it in {cached.parent}") from None
    return cached


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(path, sha256, force=False):
    """The file must be pytorch-fid's (its name carries the start of this hash, torch hub's convention).
    FID from other weights is not comparable with published numbers: refused, or with `force` a warning."""
    if sha256 == WEIGHTS_SHA256:
        return
    message = (f"{path}: SHA-256 {sha256[:16]}… is not that of {WEIGHTS_FILE} ({WEIGHTS_SHA256[:16]}…), "
               f"so its FID is not comparable with published numbers")
    if not force:
        raise MinisdError(message + "; get the file from " + WEIGHTS_URL + " or pass --force-inception-weights")
    warnings.warn(message)


def load_inception(path=None, device="cpu"):
    """FIDInception with the weights at `path` (or cached / downloaded), in eval mode on `device`."""
    path = weights_path(path)
    state = read_tensors(str(path))
    net = FIDInception()
    # the classifier is not used for features
    load_exactly(net, {k: v for k, v in state.items() if not k.startswith("fc.")}, path, WEIGHTS_FILE)
    return net.to(device=device, dtype=torch.float32)


def load_exactly(net, state, path, expected):
    """`state` into `net`, every key there with its shape and no other, else an error naming the key (files
    from older torch lack num_batches_tracked, which eval mode does not use)."""
    own = net.state_dict()
    for k in own:
        if k.endswith("num_batches_tracked"):
            state.setdefault(k, own[k])
        if k not in state:
            raise MinisdError(f"{path}: missing key {k} (not {expected}?)")
        if state[k].shape != own[k].shape:
            raise MinisdError(f"{path}: {k} has shape {tuple(state[k].shape)}, want {tuple(own[k].shape)}")
    for k in state:
        if k not in own:
            raise MinisdError(f"{path}: unexpected key {k} (not {expected}?)")
    net.load_state_dict(state)
