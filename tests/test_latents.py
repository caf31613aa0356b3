"""Latents once: training from the pre-pass's cache equals encoding at every step; each file is decoded once."""
import csv
import json
import math
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import load_script

ARGS = ["--model", "tiny", "--resolution", "64", "--batch-size", "2", "--expand-every", "2", "--val-max", "2",
        "--val-images", "0", "--cfg-dropout", "0.5"]


def train(monkeypatch, cwd, *flags):
    """train.py in this process; returns the run folder's step losses and final adapter."""
    monkeypatch.chdir(cwd)
    load_script("train.py").main([*ARGS, *flags])
    name = flags[flags.index("--run-name") + 1]
    with open(cwd / "runs" / name / "log.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    return losses, load_file(cwd / "runs" / name / "adapter_last.safetensors")


def test_cached_latents_and_prompts_train_like_encoding_at_every_step(tmp_path, monkeypatch):
    """The same draws from the run's generator on the same latent distributions: the same run, up to the
    rounding of encoding images (and prompts) in other batches."""
    common = ["--data", "phantom", "--max-steps", "4", "--freeze-text-encoder"]
    cached = train(monkeypatch, tmp_path, *common, "--run-name", "cached")
    encoded = train(monkeypatch, tmp_path, *common, "--no-cache-latents", "--run-name", "encoded")
    assert cached[0] == pytest.approx(encoded[0], rel=1e-5)
    assert cached[1].keys() == encoded[1].keys() and len(cached[1]) > 0
    for name, value in cached[1].items():
        assert value.shape == encoded[1][name].shape, name   # the same growth decisions
        assert torch.allclose(value, encoded[1][name], rtol=1e-4, atol=1e-7), name


def folder_data(root, splits, text=lambda k: f"film {k % 3}"):
    root.mkdir()
    rng = np.random.default_rng(0)
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text", "split"])
        for k, split in enumerate(s for s, count in splits.items() for _ in range(count)):
            Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / f"{k}.png")
            writer.writerow([f"{k}.png", text(k), split])


def test_the_pre_pass_decodes_each_file_once(tmp_path, monkeypatch):
    from minisd import data
    folder_data(tmp_path / "films", {"train": 10, "val": 3})
    decoded = Counter()
    load_image = data.load_image

    def counting(path, *args, **kwargs):
        decoded[path.name] += 1
        return load_image(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_image", counting)
    # 2 epochs over the training split (5 steps each), and a validation loss on 2 images at each epoch's end
    train(monkeypatch, tmp_path, "--data", "folder", "--data-root", str(tmp_path / "films"), "--max-steps", "10",
          "--run-name", "films")
    manifest = lambda split: [json.loads(line)["file"] for line in open(tmp_path / "runs" / "films" / f"manifest_{split}.jsonl")]  # noqa: E731
    used = manifest("train") + manifest("val")[:2]
    assert sorted(decoded) == sorted(used) and set(decoded.values()) == {1}


@pytest.mark.parametrize("flags", [[], ["--freeze-text-encoder"]])
def test_long_reports_are_warned_about_once_per_run(tmp_path, monkeypatch, flags):
    """Whether prompts are tokenised as batches first meet them or all at once for the prompt cache."""
    folder_data(tmp_path / "films", {"train": 10, "val": 3}, text=lambda k: f"film {k} " + "pleural effusion " * 60)
    script = load_script("train.py")   # before recording: loading it routes warnings to its display
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        script.main([*ARGS, "--data", "folder", "--data-root", str(tmp_path / "films"), "--max-steps", "6",
                     "--run-name", "long", *flags])
    said = [str(w.message) for w in caught if "tokens" in str(w.message) and "truncated" in str(w.message)]
    assert len(said) == 1, said


def test_disk_cache_is_reused_only_for_the_same_vae(tmp_path, monkeypatch):
    import minisd
    from minisd import latents
    from minisd.data import load_dataset
    ds = load_dataset("phantom", split="val", resolution=32)
    encoded = []
    encode_images = latents.encode_images
    monkeypatch.setattr(latents, "encode_images", lambda *a, **k: encoded.append(len(a[2])) or encode_images(*a, **k))
    path = tmp_path / "latents_val.safetensors"

    def cache(sd, indices):
        return latents.build_latent_cache(sd, ds, indices, 2, lambda: torch.autocast("cpu", enabled=False), "fp32",
                                          path=str(path), show=False)

    sd = minisd.build("tiny", seed=0)
    first = cache(sd, [4, 1, 3])
    again = cache(sd, [3, 1])   # a subset of what the file holds: read back, not encoded
    assert encoded == [3]
    rows = again.rows([1, 3])
    assert torch.equal(again.mean[rows], first.mean[first.rows([1, 3])])
    assert torch.equal(again.logvar[rows], first.logvar[first.rows([1, 3])])
    cache(minisd.build("tiny", seed=1), [3, 1])   # another VAE: encoded again
    assert encoded == [3, 2]


def truncated(path):
    path.write_bytes(path.read_bytes()[:200])


def retagged(change):
    """The file rewritten with its own key (so that it would be read) and `change(tensors, metadata)` applied."""
    def damage(path):
        from safetensors import safe_open
        from safetensors.torch import save_file
        with safe_open(path, "pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        change(tensors, metadata)
        save_file(tensors, path, metadata)
    return damage


@pytest.mark.parametrize("damage, message", [   # each was a traceback, or damaged latents trained on
    (truncated, "Error while deserializing header"),
    (retagged(lambda t, m: m.update(ids="5")), "its ids are not a list of sample ids"),
    (retagged(lambda t, m: m.update(ids='[["x"]]')), "its ids are not a list of sample ids"),
    (retagged(lambda t, m: t.update(mean=t["mean"][:, :, :2].contiguous())), r"mean is torch.float32 \[3, 4, 2, 4\]"),
    (retagged(lambda t, m: t.update(logvar=t["logvar"].half())), "logvar is torch.float16"),
    (retagged(lambda t, m: t.update(mean=t["mean"] * math.nan)), "mean holds NaN or infinite values"),
    (retagged(lambda t, m: t.pop("logvar")), "logvar"),
])
def test_a_damaged_disk_cache_is_encoded_again(tmp_path, damage, message):
    import minisd
    from minisd import latents
    from minisd.data import load_dataset
    ds, sd = load_dataset("phantom", split="val", resolution=32), minisd.build("tiny")
    path = tmp_path / "latents_val.safetensors"

    def cache():
        return latents.build_latent_cache(sd, ds, [4, 1, 3], 3, lambda: torch.autocast("cpu", enabled=False), "fp32",
                                          path=str(path), show=False)
    first = cache()
    damage(path)
    with pytest.warns(UserWarning, match=f"latents_val.safetensors: damaged .*{message}.*encoding the latents again"):
        again = cache()
    assert torch.equal(again.mean, first.mean) and torch.equal(again.logvar, first.logvar)
    assert torch.equal(cache().mean, first.mean)   # and written whole again
