"""Checkpoint quirks load; every bad checkpoint is one clear error naming the problem."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd import checkpoint
from minisd.errors import MinisdError
from helpers import ROOT, random_model



@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    checkpoint.save_single_file(model, str(path))
    return load_file(str(path))


def write(tmp_path, tensors, name="m.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return str(path)


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x.float(), y.float()), name


def test_real_file_quirks_load(model, single, tmp_path):
    """Schedule buffers, EMA bookkeeping, position ids and logit scale are ignored; the text encoder
    may lack `text_model.`; the VAE attention may be stored as linear [C, C] weights."""
    t = dict(single)
    t.update({"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "posterior_mean_coef1": torch.rand(1000),
              "sqrt_one_minus_alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(3), "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
              "logit_scale": torch.tensor(4.6)})
    prefix = "cond_stage_model.transformer.text_model."
    for key in [k for k in t if k.startswith(prefix)]:
        t["cond_stage_model.transformer." + key[len(prefix):]] = t.pop(key)
    q = "first_stage_model.encoder.mid.attn_1.q.weight"
    t[q] = t[q][:, :, 0, 0].clone()
    assert_same_weights(model, minisd.load(write(tmp_path, t)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_files_load_into_requested_dtype(single, tmp_path, dtype):
    path = write(tmp_path, {k: v.to(dtype) for k, v in single.items()})
    loaded = minisd.load(path, dtype=torch.float32)
    assert loaded.dtype == torch.float32 and all(p.dtype == torch.float32 for p in loaded.parameters())
    assert minisd.load(path, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_ckpt_loads_without_pickle(model, single, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": dict(single), "global_step": 10}, path)
    assert_same_weights(model, minisd.load(str(path)))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case, expect", [
    ("missing", "no such file or folder"),
    ("truncated", "not a readable safetensors file"),
    ("not_safetensors", "not a readable safetensors file"),
    ("unknown_dir", "unknown layout"),
    ("unknown_suffix", "unknown checkpoint type"),
    ("unexpected", "unexpected key 'model.diffusion_model.extra.weight'"),
    ("missing_key", "missing key 'model.diffusion_model.out.2.bias'"),
    ("shape", "'model.diffusion_model.time_embed.2.weight' has shape"),
    ("no_weights", "no SD-1.5 weights"),
    ("pickle", "weights-only"),
])
def test_bad_checkpoints_name_the_problem(single, tmp_path, case, expect):
    t = dict(single)
    if case == "missing":
        path = str(tmp_path / "nope.safetensors")
    elif case == "truncated":
        full = write(tmp_path, t)
        data = open(full, "rb").read()
        path = str(tmp_path / "cut.safetensors")
        open(path, "wb").write(data[: len(data) // 2])
    elif case == "not_safetensors":
        path = str(tmp_path / "x.safetensors")
        open(path, "w").write("hello")
    elif case == "unknown_dir":
        path = str(tmp_path)
    elif case == "unknown_suffix":
        path = str(tmp_path / "weights.txt")
        open(path, "w").write("x")
    elif case == "unexpected":
        t["model.diffusion_model.extra.weight"] = torch.zeros(1)
        path = write(tmp_path, t)
    elif case == "missing_key":
        del t["model.diffusion_model.out.2.bias"]
        path = write(tmp_path, t)
    elif case == "shape":
        t["model.diffusion_model.time_embed.2.weight"] = torch.zeros(3, 3)
        path = write(tmp_path, t)
    elif case == "no_weights":
        path = write(tmp_path, {"betas": torch.zeros(3)})
    elif case == "pickle":
        path = str(tmp_path / "evil.ckpt")
        torch.save({"state_dict": {}, "obj": Evil()}, path)
    with pytest.raises(MinisdError, match=expect.replace("(", r"\(").replace(".", r"\.")) as e:
        minisd.load(path)
    assert "\n" not in str(e.value)


def test_diffusers_folder_errors(model, tmp_path):
    checkpoint.save_diffusers(model, str(tmp_path))
    vae = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(vae))
    tensors["decoder.bogus.weight"] = torch.zeros(1)
    save_file(tensors, str(vae))
    with pytest.raises(MinisdError, match="unexpected key 'decoder.bogus.weight'"):
        minisd.load(str(tmp_path))
    os.remove(vae)
    with pytest.raises(MinisdError, match="vae: no weights file"):
        minisd.load(str(tmp_path))
    os.remove(tmp_path / "unet" / "config.json")
    with pytest.raises(MinisdError, match="config.json: missing"):
        minisd.load(str(tmp_path))


def test_old_diffusers_vae_attention_names(model, tmp_path):
    checkpoint.save_diffusers(model, str(tmp_path))
    vae = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for k, v in load_file(str(vae)).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        tensors[k] = v
    save_file(tensors, str(vae))
    assert_same_weights(model, minisd.load(str(tmp_path)))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MinisdError, match="not in the local huggingface cache.*--model PATH"):
        minisd.load("someone/some-sd15-model")


def test_script_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a checkpoint")
    r = subprocess.run([sys.executable, "sample.py", "--model", str(bad), "--prompt", "x"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "bad.safetensors" in r.stderr


def test_sample_script_writes_images(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a chest x-ray\n\nan enlarged heart\n")
    r = subprocess.run([sys.executable, "sample.py", "--model", "tiny", "--prompts", str(prompts), "--prompt", "lungs",
                        "--steps", "4", "--height", "64", "--width", "48", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["0000-seed0.png", "0001-seed1.png", "0002-seed2.png", "grid.png", "prompts.json"]
    from PIL import Image
    assert Image.open(tmp_path / "out" / "0000-seed0.png").size == (48, 64)
    assert [p["prompt"] for p in json.load(open(tmp_path / "out" / "prompts.json"))] == ["lungs", "a chest x-ray", "an enlarged heart"]
