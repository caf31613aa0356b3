"""minisd.metrics and minisd.inception against pytorch-fid, open_clip and scipy, with random weights."""
import json
import math
import urllib.error
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms as TF
from PIL import Image
from scipy import ndimage

from minisd import inception, metrics
from minisd.errors import MinisdError
from minisd.inception import DIMS

pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
pytorch_fid_score = pytest.importorskip("pytorch_fid.fid_score")


def random_pytorch_fid_weights(path):
    """pytorch-fid's FID Inception (torchvision Inception3 with its FID blocks) with random weights and
    BatchNorm statistics, saved in the layout of pt_inception-2015-12-05-6726825d.pth."""
    pfi = pytorch_fid_inception
    torch.manual_seed(0)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    # random affine BN parameters, running statistics from images like the test's (so activations stay
    # O(1) through all layers), then those statistics perturbed
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.2)
            m.momentum = None
        net.train()
        x = torch.nn.functional.interpolate(torch.rand(2, 3, 48, 48), size=(299, 299), mode="bilinear") * 2 - 1
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]:
            x = getattr(net, name)(x)
        for m in bns:
            m.running_mean += 0.1 * torch.randn_like(m.running_mean) * m.running_var.sqrt()
            m.running_var *= torch.empty_like(m.running_var).uniform_(0.8, 1.25)
    torch.save(net.eval().state_dict(), path)
    return path


def write_images(folder, n, size, seed, shift=0.0, gray=()):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    for i in range(n):
        x = (torch.rand(3, size, size, generator=g) * 0.6 + shift + 0.3 * ramp * torch.rand(1, generator=g)).clamp(0, 1)
        a = (x * 255).round().byte().permute(1, 2, 0).numpy()
        im = Image.fromarray(a).convert("L") if i in gray else Image.fromarray(a)
        im.save(folder / f"{i:02d}.png")
    return metrics.list_images(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Random weights, two PNG folders, and their features by minisd and by pytorch-fid: dims 64 and 192
    of every image (cheap, the network stops early), all four dims of the first three images."""
    tmp = tmp_path_factory.mktemp("fid")
    weights = random_pytorch_fid_weights(tmp / inception.WEIGHTS_FILE)
    real = write_images(tmp / "real", 8, 48, seed=1, gray=(3,))
    fake = write_images(tmp / "fake", 8, 48, seed=2, shift=0.15)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                   lambda *a, **k: torch.load(weights, map_location="cpu", weights_only=True))
        reference_nets = {dims: pytorch_fid_inception.InceptionV3(list(range(len(dims)))).eval()
                          for dims in [DIMS[:2], DIMS]}

    def reference(files, dims):
        # pytorch-fid's get_activations, for several blocks in one pass: ToTensor, its model, avg-pool
        dataset = pytorch_fid_score.ImagePathDataset(files, transforms=TF.ToTensor())
        acts = {d: [] for d in dims}
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=50):
                for d, out in zip(dims, reference_nets[dims](batch)):
                    acts[d].append(torch.nn.functional.adaptive_avg_pool2d(out, (1, 1)).squeeze(3).squeeze(2).numpy())
        return {d: np.concatenate(a).astype(np.float64) for d, a in acts.items()}

    net = inception.load_inception(weights)
    out = dict(weights=weights, real=real, fake=fake, net=net, reference=reference, mine={}, ref={})
    for which, files in (("real", real), ("fake", fake)):
        out["mine"][which] = metrics.inception_features(net, files, DIMS[:2])
        out["ref"][which] = reference(files, DIMS[:2])
        out["mine"][which + "3"] = metrics.inception_features(net, files[:3], DIMS)
        out["ref"][which + "3"] = reference(files[:3], DIMS)
    return out


def pytorch_fid_value(real, fake):
    return pytorch_fid_score.calculate_frechet_distance(real.mean(0), np.cov(real, rowvar=False),
                                                        fake.mean(0), np.cov(fake, rowvar=False))


def test_inception_features_match_pytorch_fid(setup):
    for which, dims, n in (("real", DIMS[:2], 8), ("fake", DIMS[:2], 8), ("real3", DIMS, 3), ("fake3", DIMS, 3)):
        for d in dims:
            mine, ref = setup["mine"][which][d], setup["ref"][which][d]
            assert mine.shape == ref.shape == (n, d) and mine.dtype == np.float64
            assert np.abs(mine - ref).max() <= 1e-4 * np.abs(ref).max(), (which, d)
            assert ref.std(0).mean() > 1e-3 * np.abs(ref).mean()  # features vary across images


@pytest.mark.parametrize("dim", [64, 192])
def test_fid_matches_pytorch_fid(setup, dim):
    expected = pytorch_fid_value(setup["ref"]["real"][dim], setup["ref"]["fake"][dim])
    with pytest.warns(UserWarning, match=f"FID-{dim}: 8 real / 8 generated images, fewer than the {dim}"):
        got = metrics.fid({dim: setup["mine"]["real"][dim]}, {dim: setup["mine"]["fake"][dim]})[dim]
    assert expected > 0
    assert abs(got - expected) <= 1e-3 * abs(expected)


@pytest.mark.slow
def test_fid_768_and_2048_match_pytorch_fid(setup):
    mine = [metrics.inception_features(setup["net"], setup[w], DIMS[2:]) for w in ("real", "fake")]
    ref = [setup["reference"](setup[w], DIMS) for w in ("real", "fake")]
    for d in DIMS[2:]:
        expected = pytorch_fid_value(ref[0][d], ref[1][d])
        got = metrics.fid({d: mine[0][d]}, {d: mine[1][d]})[d]
        assert abs(got - expected) <= 1e-3 * abs(expected), d


def test_uint8_files_and_float_input_give_equal_fid(setup):
    dims = (64, 192)
    floats = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
              for f in setup["fake"]]
    assert floats[0].dtype == torch.float32
    from_files = metrics.fid(setup["mine"]["real"], metrics.inception_features(setup["net"], setup["fake"], dims))
    from_floats = metrics.fid(setup["mine"]["real"], metrics.inception_features(setup["net"], floats, dims))
    assert from_files == from_floats


def test_grayscale_file_is_repeated_to_three_channels(setup):
    gray = setup["real"][3]
    assert Image.open(gray).mode == "L"
    x = metrics.load_image(gray)
    assert x.shape == (3, 48, 48) and x.dtype == torch.uint8
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert torch.equal(x[0], torch.from_numpy(np.asarray(Image.open(gray))))


def test_features_do_not_depend_on_batch_size(setup, tmp_path):
    # mixed sizes too: a 40 px image among 48 px ones
    files = setup["real"][:5] + write_images(tmp_path / "small", 1, 40, seed=3)
    one = metrics.inception_features(setup["net"], files, dims=(64,), batch_size=1)[64]
    all_ = metrics.inception_features(setup["net"], files, dims=(64,), batch_size=6)[64]
    some = metrics.inception_features(setup["net"], files, dims=(64,), batch_size=4)[64]
    assert np.abs(one - all_).max() <= 1e-6 * np.abs(one).max()
    assert np.abs(one - some).max() <= 1e-6 * np.abs(one).max()
    np.testing.assert_allclose(one[:5], setup["mine"]["real"][64][:5], rtol=0, atol=1e-6 * np.abs(one).max())


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    a = (np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "x16.png")
    x = metrics.load_image(tmp_path / "x16.png")
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32
    np.testing.assert_allclose(x[2].numpy(), a / 65535.0, rtol=1e-6)


def test_real_features_are_cached_by_content(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    files = setup["real"][:3]
    first = metrics.cached_features(setup["net"], files, "w", "mode", dims=(64,))
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1

    def no_model(*args, **kwargs):
        raise AssertionError("features were computed again")
    again = metrics.cached_features(no_model, files, "w", "mode", dims=(64,))
    assert np.array_equal(first[64], again[64])
    # another weights hash, resize mode or image content is another entry
    metrics.cached_features(setup["net"], files, "w2", "mode", dims=(64,))
    metrics.cached_features(setup["net"], files, "w", "mode2", dims=(64,))
    changed = write_images(tmp_path / "changed", 3, 48, seed=9)
    metrics.cached_features(setup["net"], changed, "w", "mode", dims=(64,))
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 4


def test_weights_missing_key_and_shape_are_named(setup, tmp_path):
    state = torch.load(setup["weights"], weights_only=True)
    assert "fc.weight" in state  # the real file's layout: the classifier is there, and ignored
    del state["Mixed_6c.branch7x7_2.conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(MinisdError, match=r"bad.pth: missing key Mixed_6c.branch7x7_2.conv.weight"):
        inception.load_inception(tmp_path / "bad.pth")
    state = {k: v for k, v in torch.load(setup["weights"], weights_only=True).items()
             if not k.endswith("num_batches_tracked")}  # files written by older torch
    state["Conv2d_1a_3x3.bn.running_mean"] = torch.zeros(31)
    torch.save(state, tmp_path / "bad2.pth")
    with pytest.raises(MinisdError, match=r"Conv2d_1a_3x3.bn.running_mean has shape \(31,\), want \(32,\)"):
        inception.load_inception(tmp_path / "bad2.pth")


def test_missing_inception_weights_offline_names_file_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))

    def offline(url, dst, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MinisdError) as e:
        inception.load_inception()
    message = str(e.value)
    assert inception.WEIGHTS_FILE in message and inception.WEIGHTS_URL in message and "--inception-weights" in message
    assert "\n" not in message
    with pytest.raises(MinisdError, match=r"--inception-weights .*nope.pth: no such file"):
        inception.load_inception(tmp_path / "nope.pth")


@pytest.mark.parametrize("content, message", [
    (b"not weights\n", "not a readable PyTorch checkpoint"),
    (None, "missing key Conv2d_1a_3x3.conv.weight"),   # a state dict, of something else
])
def test_wrong_inception_weights_are_one_line(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save({"layer.weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(MinisdError, match=message) as e:
        inception.load_inception(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_weights_come_from_the_cache_folder(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path))
    (tmp_path / inception.WEIGHTS_FILE).write_bytes(setup["weights"].read_bytes())
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    assert inception.weights_path() == tmp_path / inception.WEIGHTS_FILE


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(MinisdError, match=r"empty: no images"):
        metrics.list_images(tmp_path / "empty")
    with pytest.raises(MinisdError, match=r"missing: no such folder"):
        metrics.list_images(tmp_path / "missing")
    write_images(tmp_path / "broken", 2, 32, seed=0)
    (tmp_path / "broken" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = metrics.list_images(tmp_path / "broken")
    assert len(files) == 2  # listed, and then not silently dropped:
    with pytest.raises(MinisdError, match=r"broken/01.png: cannot read image"):
        metrics.inception_features(lambda x, dims: pytest.fail("ran"), files, dims=(64,))


# ---------------------------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_of_diagonal_gaussians():
    # for commuting covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_retries_with_eps_offset(monkeypatch):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4)) + 0.5
    mu1, s1 = metrics.activation_statistics(x)
    mu2, s2 = metrics.activation_statistics(y)
    real_sqrtm, calls = metrics.linalg.sqrtm, []

    def singular_first(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)
    monkeypatch.setattr(metrics.linalg, "sqrtm", singular_first)
    with pytest.warns(UserWarning, match="singular covariance product; adding 1e-06"):
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
    offset = np.eye(4) * 1e-6
    np.testing.assert_allclose(calls[1], (s1 + offset) @ (s2 + offset))
    monkeypatch.setattr(metrics.linalg, "sqrtm", real_sqrtm)
    assert got == pytest.approx(pytorch_fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_distance_rejects_imaginary_component(monkeypatch):
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: np.eye(len(a)) * (1 + 1j))
    with pytest.raises(MinisdError, match="imaginary component 1.0"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_fid_leaves_out_only_an_undersampled_dim_whose_root_is_not_real(monkeypatch):
    rng = np.random.default_rng(0)
    real, fake = ({d: rng.normal(size=(6, d)) for d in (4, 8)} for _ in range(2))
    want = pytorch_fid_score.calculate_frechet_distance(*metrics.activation_statistics(real[4]),
                                                        *metrics.activation_statistics(fake[4]))
    real_sqrtm = metrics.linalg.sqrtm
    monkeypatch.setattr(metrics.linalg, "sqrtm", lambda a: real_sqrtm(a) + (1j if len(a) == 8 else 0))
    with pytest.warns(UserWarning) as caught:
        got = metrics.fid(real, fake)
    assert got[8] is None and got[4] == pytest.approx(want, rel=1e-6)
    assert any("FID-8: not computed" in str(w.message) and "imaginary component" in str(w.message) for w in caught)
    real[8], fake[8] = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))  # enough images: still an error
    with pytest.raises(MinisdError, match="imaginary component"):
        metrics.fid(real, fake)


def test_fid_needs_two_images():
    with pytest.raises(MinisdError, match="at least 2 images"):
        metrics.fid({64: np.zeros((1, 64))}, {64: np.ones((5, 64))})


# ---------------------------------------------------------------------------------------------- KID

def unbiased_mmd2(x, y):
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)) + 0.3
    mean, std = metrics.kid(x, y, subset_size=7, subsets=3)  # whole sets: every subset is a permutation
    assert mean == pytest.approx(unbiased_mmd2(x, y), rel=1e-10)
    assert std == pytest.approx(0, abs=1e-10)
    mean, std = metrics.kid(x, y, subset_size=4, subsets=50)
    rs = np.random.RandomState(0)
    draws = []
    for _ in range(50):
        draws.append(unbiased_mmd2(x[rs.choice(7, 4, replace=False)], y[rs.choice(7, 4, replace=False)]))
    assert mean == pytest.approx(np.mean(draws), rel=1e-10) and std == pytest.approx(np.std(draws), rel=1e-8)
    assert std > 0


def test_kid_subset_size_is_checked():
    with pytest.raises(MinisdError, match=r"--kid-subset-size 9: .*\(8 real, 5 generated\)"):
        metrics.kid(np.zeros((8, 4)), np.zeros((5, 4)), subset_size=9)


# ---------------------------------------------------------------------------------------------- SSIM, PSNR

def reference_ssim(a, b):
    """skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=0), which filters with scipy.ndimage.gaussian_filter and crops 5 px."""
    def filt(x):
        return ndimage.gaussian_filter(x, sigma=1.5, truncate=3.5)[5:-5, 5:-5]
    out = []
    for x, y in zip(a, b):
        mx, my = filt(x), filt(y)
        vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        out.append((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())
    return float(np.mean(out))


def test_ssim_and_psnr_match_references():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 32, 40, generator=g, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(3, 32, 40, generator=g, dtype=torch.float64)).clamp(0, 1)
    assert metrics.ssim(a, b) == pytest.approx(reference_ssim(a.numpy(), b.numpy()), rel=1e-9)
    assert metrics.ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(a, b) == pytest.approx(metrics.ssim(b, a), rel=1e-12)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(1 / ((a - b) ** 2).mean().item()), rel=1e-12)
    assert metrics.psnr(a, a) == math.inf
    u8 = (a * 255).round().to(torch.uint8)
    assert metrics.ssim(u8, b) == pytest.approx(metrics.ssim(u8.double() / 255, b), rel=1e-6)
    with pytest.raises(MinisdError, match="sizes differ"):
        metrics.ssim(a, b[:, :30])
    with pytest.raises(MinisdError, match="smaller than the 11x11 window"):
        metrics.ssim(a[:, :8], b[:, :8])


# ---------------------------------------------------------------------------------------------- CLIP score

TINY_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small open_clip architecture with QuickGELU (ViT-L-14 is slow to build on a CPU), random weights."""
    import open_clip
    tmp = tmp_path_factory.mktemp("clip")
    (tmp / "minisd-test-tiny-quickgelu.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp / "minisd-test-tiny-quickgelu.json")
    torch.manual_seed(0)
    model = open_clip.create_model("minisd-test-tiny-quickgelu")
    torch.save(model.state_dict(), tmp / "clip.pt")
    return "minisd-test-tiny-quickgelu", tmp / "clip.pt"


def test_clip_score_equals_open_clip(setup, tiny_clip):
    import open_clip
    name, weights = tiny_clip
    prompts = [f"chest x-ray {i}, heart size normal" for i in range(7)] + ["no acute disease " * 40]
    clip = metrics.load_clip(weights, model_name=name)
    with pytest.warns(UserWarning, match="1 of 8 prompts are longer than 77 tokens"):
        got = metrics.clip_score(setup["fake"], prompts, clip, batch_size=3)
    assert got["truncated"] == 1

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        e_img = model.encode_image(torch.stack([preprocess(Image.open(f).convert("RGB")) for f in setup["fake"]]))
        e_txt = model.encode_text(tokenizer(prompts))
    cos = torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1)
    expected = (100 * cos.clamp(min=0)).tolist()
    assert 0 < sum(e > 0 for e in expected) < len(expected)  # both sides of the max(., 0)
    np.testing.assert_allclose(got["scores"], expected, rtol=1e-5, atol=1e-4)
    assert got["mean"] == pytest.approx(np.mean(expected), rel=1e-5, abs=1e-4)
    assert got["std"] == pytest.approx(np.std(expected), rel=1e-4, abs=1e-4)
    with pytest.raises(MinisdError, match="8 images but 7 prompts"):
        metrics.clip_score(setup["fake"], prompts[:7], clip)


def test_missing_clip_weights_offline_names_url(tmp_path, monkeypatch):
    import open_clip.factory
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(MinisdError) as e:
        metrics.load_clip()
    message = str(e.value)
    assert metrics.CLIP_MODEL in message and metrics.CLIP_WEIGHTS_URL in message and "--clip-weights" in message
    assert "\n" not in message
    with pytest.raises(MinisdError, match=r"--clip-weights .*nope.pt: no such file"):
        metrics.load_clip(tmp_path / "nope.pt")


def test_warns_only_where_images_are_fewer_than_dims():
    rng = np.random.default_rng(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics.fid({4: rng.random((6, 4)), 8: rng.random((6, 8))}, {4: rng.random((9, 4)), 8: rng.random((9, 8))})
    assert [str(w.message) for w in caught] == [
        "FID-8: 6 real / 9 generated images, fewer than the 8 feature dims; the covariances are singular and "
        "the value is not comparable with published FIDs"]
