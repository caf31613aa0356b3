"""eval.py: folder mode end to end with random weights, run resolution, and its errors."""
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minisd import evaluation, inception, metrics
from minisd.errors import MinisdError
from minisd.inception import FIDInception
from helpers import load_script

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_images(folder, names, size, seed, shift=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for name in names:
        x = (torch.rand(3, size, size, generator=g) * 0.7 + shift).clamp(0, 1)
        Image.fromarray((x * 255).round().byte().permute(1, 2, 0).numpy()).save(folder / name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Random FID-Inception and small open_clip weights, paired real/fake folders and their prompts."""
    import open_clip
    tmp = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.05, 0.2)
    torch.save(net.state_dict(), tmp / "inception.pth")
    (tmp / "tiny-eval-quickgelu.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp / "tiny-eval-quickgelu.json")
    torch.save(open_clip.create_model("tiny-eval-quickgelu").state_dict(), tmp / "clip.pt")
    names = [f"case{i}.png" for i in range(6)]
    write_images(tmp / "real", names, 32, seed=1)
    write_images(tmp / "fake", names, 32, seed=2, shift=0.2)
    prompts = [f"heart size normal, case {i}" for i in range(5)] + ["lungs are clear " * 30]
    (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return tmp


@pytest.fixture
def script(ws, monkeypatch, tmp_path):
    monkeypatch.setenv("MINISD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(metrics, "CLIP_MODEL", "tiny-eval-quickgelu")
    return load_script("eval.py")


def folder_args(ws, out, *extra):
    return ["--real", str(ws / "real"), "--fake", str(ws / "fake"), "--inception-weights", str(ws / "inception.pth"),
            "--dims", "64", "192", "--out", str(out), "--batch-size", "4", "--force-inception-weights", *extra]


def test_folder_mode(ws, script, tmp_path, capsys):
    out = tmp_path / "out"
    report = script.main(folder_args(ws, out, "--prompts", str(ws / "prompts.txt"),
                                     "--clip-weights", str(ws / "clip.pt"), "--kid-subset-size", "4"))
    printed = capsys.readouterr()
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(report))

    # the numbers are those of the library on the same files
    net = inception.load_inception(ws / "inception.pth")
    real, fake = metrics.list_images(ws / "real"), metrics.list_images(ws / "fake")
    feats = [metrics.inception_features(net, files, (64, 192)) for files in (real, fake)]
    assert report["fid"] == {str(d): v for d, v in metrics.fid(*feats).items()}
    assert (report["kid"]["mean"], report["kid"]["std"]) == metrics.kid(feats[0][192], feats[1][192], 4, 100)
    assert report["kid"]["subset_size"] == 4 and report["kid"]["dims"] == 192
    prompts = (ws / "prompts.txt").read_text().splitlines()
    clip = metrics.clip_score(fake, prompts, metrics.load_clip(ws / "clip.pt"))
    assert list(report["clip_score"]["per_image"]) == [f.name for f in fake]
    np.testing.assert_allclose(list(report["clip_score"]["per_image"].values()), clip["scores"], rtol=1e-6)
    assert report["truncated_prompts"] == 1
    ssim = [metrics.ssim(r, f) for r, f in zip(real, fake)]
    assert report["ssim"]["mean"] == pytest.approx(np.mean(ssim), rel=1e-12) and report["ssim"]["pairs"] == 6
    assert report["psnr"]["mean"] == pytest.approx(np.mean([metrics.psnr(r, f) for r, f in zip(real, fake)]))

    assert report["images"] == {"real": 6, "generated": 6}
    assert report["inception_weights"]["sha256"] == hashlib.sha256((ws / "inception.pth").read_bytes()).hexdigest()
    assert report["clip_weights"] == {"path": str(ws / "clip.pt"),
                                      "sha256": hashlib.sha256((ws / "clip.pt").read_bytes()).hexdigest()}
    assert report["resize_mode"] == inception.RESIZE_MODE
    warned = " | ".join(report["warnings"])
    assert "FID-64: 6 real / 6 generated images, fewer than the 64 feature dims" in warned
    assert "1 of 6 prompts are longer than 77 tokens" in warned
    assert "is not that of pt_inception-2015-12-05-6726825d.pth" in warned and "not comparable" in warned

    table = (out / "eval.md").read_text()
    assert table in printed.out
    for row in ("| FID-64 |", "| FID-192 |", "| KID (192-d) |", "| CLIP score |", "| SSIM |", "| PSNR (dB) |"):
        assert row in table
    assert f"| FID-64 | {evaluation.fmt(report['fid']['64'])} |" in table
    assert Image.open(out / "grid.png").size == (6 * 130 + 2, 2 * 130 + 2)


def test_eval_json_is_standard_json_when_a_metric_is_infinite(ws, script, tmp_path):
    """Identical real and generated images: PSNR is infinite, which JSON cannot hold (Python's json would
    write Infinity, which strict parsers refuse)."""
    out = tmp_path / "out"
    argv = folder_args(ws, out, "--no-clip")
    report = script.main([*argv[:argv.index("--fake") + 1], str(ws / "real"), *argv[argv.index("--fake") + 2:]])
    assert report["psnr"]["mean"] == float("inf")

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    written = json.loads((out / "eval.json").read_text(), parse_constant=refuse)
    assert written["psnr"]["mean"] is None and written["ssim"]["mean"] == pytest.approx(1.0)
    assert "| PSNR (dB) | inf ± 0 |" in (out / "eval.md").read_text()


def test_an_adapter_keeps_its_split_on_the_other_release_of_its_studies(tmp_path, script):
    """Trained on OpenI's release with data seed 1: evaluated on the Kaggle release of the same studies, the split
    is still seed 1's (seed 0's test images would include its training images)."""
    from argparse import Namespace
    from minisd.adapters.io import write_adapter
    adapter = tmp_path / "adapter.safetensors"
    write_adapter(adapter, {"layer.lora_A": torch.zeros(1, 4), "layer.lora_B": torch.zeros(4, 1)}, "lora", 1.0, 1.0,
                  {"layer": 1}, "base", args={"data": "openi", "data_seed": 1, "resolution": 64})
    args = Namespace(adapter=str(adapter), data="iuxray", data_seed=None, resolution=None, window=None, split="test",
                     fractions=None, manifest=None)
    script.resolve_adapter(args)
    assert (args.data_seed, args.manifest) == (1, None)
    with pytest.raises(MinisdError, match="trained on the openi split of data seed 1"):
        script.resolve_adapter(Namespace(**{**vars(args), "data_seed": 0}))
    phantom = Namespace(**{**vars(args), "data": "phantom", "data_seed": None})
    script.resolve_adapter(phantom)
    assert phantom.data_seed is None


@pytest.mark.parametrize("recorded, message", [
    ({"resolution": "ab"}, "recorded resolution is \"ab\", expected an integer"),
    ({"resolution": 60}, "recorded resolution must be a positive multiple of 8, at most 4096"),
    ({"window": "ab"}, "recorded window is \"ab\", expected [CENTER, WIDTH]"),
    ({"window": [40, 0]}, "recorded window must be CENTER WIDTH"),
    ({"data": "iuxray", "data_seed": -1}, "recorded data_seed must be between 0"),
    ({"data": "iuxray", "split": "50/10"}, "recorded split 50/10: expected train/val/test"),
])
def test_values_an_adapter_records_are_checked_as_their_flags(tmp_path, script, recorded, message):
    from argparse import Namespace
    from minisd.adapters.io import write_adapter
    adapter = tmp_path / "adapter.safetensors"
    write_adapter(adapter, {"layer.lora_A": torch.zeros(1, 4), "layer.lora_B": torch.zeros(4, 1)}, "lora", 1.0, 1.0,
                  {"layer": 1}, "base", args=recorded)
    args = Namespace(adapter=str(adapter), data="iuxray", data_seed=None, resolution=None, window=None, split="test",
                     fractions=None, manifest=None)
    with pytest.raises(MinisdError) as error:
        script.resolve_adapter(args)
    assert str(error.value).startswith(f"{adapter}: {message}")


def test_inception_weights_of_another_hash_are_refused_unless_forced(ws, script, tmp_path, capsys):
    argv = [a for a in folder_args(ws, tmp_path / "out") if a != "--force-inception-weights"]
    with pytest.raises(SystemExit) as stop:   # was: FID computed with any weights of the right shapes
        script.main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {ws / 'inception.pth'}: SHA-256 " in err and f"({inception.WEIGHTS_SHA256[:16]}…)" in err
    assert "--force-inception-weights" in err


def test_no_clip_needs_no_clip_weights(ws, script, tmp_path, monkeypatch):
    def load_clip(*args, **kwargs):
        raise AssertionError("CLIP loaded despite --no-clip")
    monkeypatch.setattr(metrics, "load_clip", load_clip)
    report = script.main(folder_args(ws, tmp_path / "out", "--prompts", str(ws / "prompts.txt"), "--no-clip"))
    assert report["clip_score"] is None and report["clip_weights"] is None and report["fid"]


def test_ssim_needs_every_name_paired(ws, script, tmp_path):
    write_images(tmp_path / "fake", ["case0.png", "case1.png", "other.png"], 32, seed=3)
    report = script.main(["--real", str(ws / "real"), "--fake", str(tmp_path / "fake"), "--inception-weights",
                          str(ws / "inception.pth"), "--dims", "64", "--out", str(tmp_path / "out"),
                          "--force-inception-weights"])
    assert report["ssim"] is None and report["psnr"] is None and report["clip_score"] is None
    assert any("only 2 of 3 generated files have a real file of the same name" in w for w in report["warnings"])


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "short"], r"--prompts .*short.txt: 5 prompts for 6 generated images"),
    (["--real", "EMPTY"], r"empty: no images"),
    (["--kid-subset-size", "7"], r"--kid-subset-size 7: must be between 2 and the number of images \(6 real, 6 gen"),
], ids=["prompt-count", "empty-folder", "kid-subset"])
def test_bad_input_is_one_error_line(ws, script, tmp_path, capsys, argv, message):
    (tmp_path / "short.txt").write_text("a\nb\nc\nd\ne\n")
    (tmp_path / "empty").mkdir()
    argv = [{"short": str(tmp_path / "short.txt"), "EMPTY": str(tmp_path / "empty")}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        script.main(folder_args(ws, tmp_path / "out", *argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ")
    assert re.search(message, err), err


def test_script_exits_2_with_one_line(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--real", str(tmp_path / "empty"), "--fake",
                          str(ws / "fake")], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "MINISD_CACHE": str(tmp_path / "cache")})
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'empty'}: no images (.png .jpg .jpeg .bmp .tif .tiff .dcm .dicom)"


def test_mode_errors(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for argv, message in [([], "error: no run in runs/ to evaluate"),
                          (["--real", "r"], "error: --real and --fake go together"),
                          (["--model", "tiny"], "error: --model/--adapter need --data NAME"),
                          (["--prompts", "p.txt"], "error: --prompts needs --real and --fake")]:
        with pytest.raises(SystemExit) as e:
            script.main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith(message)


def test_no_arguments_evaluate_the_latest_run(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, age in (("vae", -10), ("new", 0), ("old", 100)):   # the newest trained only a VAE: no images
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({"model": f"model-{name}", "data": "phantom", "seed": 7,
                                                   "data_root": f"data/{name}", "resolution": 64,
                                                   **({"stage": "vae"} if name == "vae" else {})}))
        (run / "adapter.safetensors").write_bytes(b"")
        t = (run / "args.json").stat().st_mtime - age
        os.utime(run / "args.json", (t, t))
    seen = {}

    def evaluate_model(args, device):
        seen.update(vars(args))
        raise script.MinisdError("stop here")
    monkeypatch.setattr(script, "evaluate_model", evaluate_model)
    with pytest.raises(SystemExit):
        script.main(["--seeds", "0"])
    assert (seen["model"], seen["data"], seen["data_root"], seen["resolution"], seen["data_seed"]) == (
        "model-new", "phantom", "data/new", 64, 7)
    assert seen["adapter"] == str(Path("runs/new/adapter.safetensors")) and seen["split"] == "test"
    assert seen["out"] == str(Path("runs/new/eval")) and seen["seeds"] == [0]


def test_model_mode_generates_per_seed_and_summarises(ws, script, tmp_path, monkeypatch):
    """Model mode against the data-set interface (items {"image" in [-1,1], "prompt", "id"}), tiny model."""
    import types

    import minisd
    from minisd.sampling import ddim_sample
    g = torch.Generator().manual_seed(5)
    items = [{"image": torch.rand(3, 64, 64, generator=g) * 2 - 1, "prompt": f"small left effusion {i}",
              "id": f"p{i}"} for i in range(3)]
    calls = []

    def load_dataset(name, root, split, resolution, seed, window=None, fractions=None):
        calls.append((name, root, split, resolution, seed, fractions))
        return items
    monkeypatch.setitem(sys.modules, "minisd.data", types.SimpleNamespace(load_dataset=load_dataset, load_manifest=None))
    out = tmp_path / "out"
    (out / "seed0").mkdir(parents=True)
    (out / "seed0" / "0099-left-by-a-failed-call.png").write_bytes(b"")
    report = script.main(["--model", "tiny", "--data", "phantom", "--resolution", "64", "--seeds", "0", "1",
                          "--steps", "1", "--guidance", "1", "--inception-weights", str(ws / "inception.pth"),
                          "--clip-weights", str(ws / "clip.pt"), "--dims", "64", "--out", str(out),
                          "--force-inception-weights"])
    assert calls == [("phantom", os.path.join("data", "phantom"), "test", 64, 0, None)]
    assert list(report["per_seed"]) == ["0", "1"] and report["images"] == {"real": 3, "generated": 3}

    # each seed's numbers are those of its PNGs against the real images
    net = inception.load_inception(ws / "inception.pth")
    real = [(x["image"] + 1) / 2 for x in items]
    real_features = metrics.inception_features(net, real, (64,))
    fids = []
    for seed in (0, 1):
        manifest = json.loads((out / f"seed{seed}" / "prompts.json").read_text())
        assert [m["noise_seed"] for m in manifest] == [3 * seed + k for k in range(3)]
        files = [out / f"seed{seed}" / m["file"] for m in manifest]
        fid = metrics.fid(real_features, metrics.inception_features(net, files, (64,)))[64]
        assert report["per_seed"][str(seed)]["fid"]["64"] == fid
        assert report["per_seed"][str(seed)]["ssim"]["pairs"] == 3
        assert report["per_seed"][str(seed)]["clip_score"] is not None
        fids.append(fid)
    assert report["summary"]["FID-64"] == {"mean": np.mean(fids), "std": np.std(fids)}
    assert not (out / "seed0" / "0099-left-by-a-failed-call.png").exists()   # was: in the seed folder, for FID
    assert fids[0] != fids[1]

    # an image is reproduced by sampling its prompt alone from its noise seed
    sd = minisd.load("tiny")
    m = json.loads((out / "seed1" / "prompts.json").read_text())[2]
    again = ddim_sample(sd, [m["prompt"]], steps=1, guidance=1, height=64, width=64, seed=m["noise_seed"],
                        progress=False)
    png = metrics.load_image(out / "seed1" / m["file"]).int()
    assert (metrics.to_uint8(again[0]).int() - png).abs().max() <= 1  # batch of 1 vs 3: float rounding
    assert Image.open(out / "grid.png").size == (3 * 130 + 2, 3 * 130 + 2)
    assert "| FID-64 |" in (out / "eval.md").read_text()


def write_folder_data(root, n):
    """A `folder` data set of n small images with captions."""
    write_images(root, [f"img{i:03d}.png" for i in range(n)], 16, seed=9)
    rows = "".join(f"img{i:03d}.png,finding number {i}\n" for i in range(n))
    (root / "metadata.csv").write_text("file_name,text\n" + rows)


def manifest_ids(path):
    return [json.loads(line)["id"] for line in Path(path).read_text().splitlines()]


def test_a_run_is_evaluated_on_its_own_test_manifest(ws, script, tmp_path, monkeypatch, capsys):
    """Trained with --seed 1: the split is the data seed's (0), all three manifests are recorded, and eval.py
    --run and the adapter mode evaluate exactly the test manifest, also after the data folder changed."""
    from minisd.data import load_dataset
    monkeypatch.chdir(tmp_path)
    write_folder_data(tmp_path / "data", 60)
    load_script("train.py").main(["--model", "tiny", "--method", "lora", "--data", "folder", "--data-root", "data",
                                  "--seed", "1", "--resolution", "64", "--batch-size", "2", "--max-steps", "1",
                                  "--val-max", "2", "--val-images", "0", "--run-name", "leak"])
    run = tmp_path / "runs" / "leak"
    ids = {split: manifest_ids(run / f"manifest_{split}.jsonl") for split in ("train", "val", "test")}
    assert len(ids["test"]) == 2 and not set(ids["test"]) & (set(ids["train"]) | set(ids["val"]))
    assert len(set(ids["train"]) | set(ids["val"]) | set(ids["test"])) == 60
    assert ids["test"] == [x["id"] for x in load_dataset("folder", "data", "test", 64, seed=0).manifest()]

    common = ["--seeds", "0", "--steps", "1", "--dims", "64", "--inception-weights", str(ws / "inception.pth"),
              "--clip-weights", str(ws / "clip.pt"), "--force-inception-weights"]
    report = script.main(["--run", "runs/leak", *common])
    assert report["ids"] == ids["test"] and Path(report["manifest"]) == Path("runs/leak/manifest_test.jsonl")
    assert (report["data_seed"], report["resolution"]) == (0, 64)
    assert json.loads((run / "eval" / "eval.json").read_text())["ids"] == ids["test"]

    write_folder_data(tmp_path / "data", 90)   # the folder grew: a split drawn today would differ
    assert [x["id"] for x in load_dataset("folder", "data", "test", 64, seed=0).manifest()] != ids["test"]
    report = script.main(["--model", "tiny", "--adapter", str(run / "adapter.safetensors"), "--data", "folder",
                          "--data-root", "data", "--out", "adapter-mode", *common])
    assert report["ids"] == ids["test"] and report["resolution"] == 64

    capsys.readouterr()
    for argv, message in ((["--run", "leak", "--data-seed", "1"], "--data-seed with a run"),
                          (["--model", "tiny", "--adapter", str(run / "adapter.safetensors"), "--data", "folder",
                            "--data-root", "data", "--data-seed", "1"], "--data-seed 1: " + str(run / "adapter.safetensors"))):
        with pytest.raises(SystemExit):
            script.main(argv + common)
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: " + message)
