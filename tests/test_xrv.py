"""FID on chest-X-ray features: minisd's DenseNet-121 and preprocessing against torchxrayvision's (test extra) on
random weights, its weights files (torchxrayvision's whole pickled model, read as data), and eval.py --features xrv."""
import hashlib
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import load_script, rel_err
from minisd import metrics, xrv
from minisd.errors import MinisdError
from minisd.inception import FIDInception
from minisd.pickled_model import read_pickled_model

xrv_reference = pytest.importorskip("torchxrayvision")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torchxrayvision's DenseNet-121 with random weights and running statistics, saved as torchxrayvision
    releases its weights (the whole model pickled) in both torch.save formats, and as a state dict."""
    from safetensors.torch import save_file
    tmp = tmp_path_factory.mktemp("xrv")
    torch.manual_seed(0)
    model = xrv_reference.models.DenseNet(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    torch.save(model, tmp / "whole.pt")
    torch.save(model, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(model.state_dict(), tmp / "state.safetensors")
    return model, tmp


def test_network_equals_torchxrayvision(weights):
    model, tmp = weights
    net, path = xrv.load_xrv(tmp / "whole.pt")
    x = torch.rand(2, 1, xrv.SIZE, xrv.SIZE, generator=torch.Generator().manual_seed(1)) * 2048 - 1024
    with torch.no_grad():
        expected, ours = model.features2(x), net(x)
    assert ours.shape == (2, xrv.DIMS) and rel_err(ours, expected) < 1e-5 and path == tmp / "whole.pt"


def test_every_weights_file_holds_the_same_tensors(weights):
    model, tmp = weights
    reference = model.state_dict()
    for name in ("whole.pt", "legacy.pt"):   # both formats of torch.save
        state = read_pickled_model(tmp / name)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    net, _ = xrv.load_xrv(tmp / "state.safetensors")
    assert all(torch.equal(v, reference[k]) for k, v in net.state_dict().items())


def test_preprocessing_equals_torchxrayvision():
    """The README's recipe: normalize(img, 255), channel mean, XRayCenterCrop, XRayResizer(224)."""
    rng = np.random.default_rng(0)
    for height, width in [(300, 260), (150, 200), (224, 224), (233, 500)]:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = xrv_reference.datasets.normalize(pixels, 255).mean(2)[None]
        expected = xrv_reference.datasets.XRayResizer(224)(xrv_reference.datasets.XRayCenterCrop()(expected))
        ours = xrv.preprocess(torch.from_numpy(pixels).permute(2, 0, 1))
        assert ours.shape == expected.shape == (1, 224, 224) and ours.dtype == np.float32
        assert np.abs(ours - expected).max() < 1e-3, (height, width)   # of a range of 2048
    grey = torch.rand(3, 180, 260, generator=torch.Generator().manual_seed(2))   # a float image in [0, 1]
    expected = xrv_reference.datasets.normalize(grey.permute(1, 2, 0).numpy(), 1).mean(2)[None]
    expected = xrv_reference.datasets.XRayResizer(224)(xrv_reference.datasets.XRayCenterCrop()(expected))
    assert np.abs(xrv.preprocess(grey) - expected).max() < 1e-3


def test_weights_read_as_data_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)
    for protocol in (2, 4):
        (tmp_path / "bad.pt").write_bytes(pickle.dumps({"model": Payload()}, protocol=protocol))
        with pytest.raises(MinisdError, match=r"bad.pt: not a model written by torch.save.*names posix.system"):
            read_pickled_model(tmp_path / "bad.pt")
    assert not (tmp_path / "ran").exists()
    with pytest.raises(MinisdError, match=r"--xrv-weights .*none.pt: no such file \(want torchxrayvision's "
                                          r"densenet121-res224-all weights, nih-pc-chex"):
        xrv.load_xrv(tmp_path / "none.pt")
    torch.save({"classifier.weight": torch.zeros(18, 1024)}, tmp_path / "classifier.pt")
    with pytest.raises(MinisdError, match=r"classifier.pt: missing key features.conv0.weight"):
        xrv.load_xrv(tmp_path / "classifier.pt")


def test_eval_reports_fid_and_kid_on_xrv_features(weights, tmp_path, monkeypatch):
    _, tmp = weights
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.save(FIDInception().state_dict(), tmp_path / "inception.pth")
    g = torch.Generator().manual_seed(3)
    for folder, shift in (("real", 0.0), ("fake", 0.3)):
        (tmp_path / folder).mkdir()
        for k in range(3):
            x = (torch.rand(40, 48, generator=g) * 0.6 + shift).clamp(0, 1)
            Image.fromarray((x * 255).round().byte().numpy()).save(tmp_path / folder / f"{k}.png")
    out = tmp_path / "out"
    report = load_script("eval.py").main(
        ["--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"), "--inception-weights",
         str(tmp_path / "inception.pth"), "--force-inception-weights", "--dims", "64", "--features", "xrv", "--xrv-weights", str(tmp / "whole.pt"),
         "--kid-subset-size", "2", "--batch-size", "4", "--out", str(out)])
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(report))
    assert report["features"] == ["inception", "xrv"] and report["dicom_window"] is None
    assert report["xrv_weights"]["sha256"] == hashlib.sha256((tmp / "whole.pt").read_bytes()).hexdigest()
    # the numbers come from the xrv features of the real and of the generated files
    net, _ = xrv.load_xrv(tmp / "whole.pt")
    real, fake = (xrv.features(net, metrics.list_images(tmp_path / f)) for f in ("real", "fake"))
    assert (report["xrv"]["kid"]["mean"], report["xrv"]["kid"]["std"]) == metrics.kid(real, fake, 2, 100)
    assert report["xrv"]["kid"]["dims"] == 1024 and report["xrv"]["fid"] > 0
    table = (out / "eval.md").read_text()
    assert "| FID-XRV |" in table and "| KID (XRV) |" in table and "FID-XRV: 3 real / 3 generated" in table
