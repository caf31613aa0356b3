"""Checkpoint quirks load; every bad checkpoint is one clear error naming the problem."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import minisd
from minisd.checkpoint.files import all_finite
from minisd.checkpoint.names import PREFIXES
from minisd.checkpoint.writing import diffusers_configs, save_diffusers, save_single_file
from minisd.errors import MinisdError
from helpers import ROOT, random_model


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.fixture(scope="module")
def single(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    save_single_file(model, str(path))
    return load_file(str(path))


def write(tmp_path, tensors, name="m.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return str(path)


def assert_same_weights(a, b):
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x.float(), y.float()), name


def test_real_file_quirks_load(model, single, tmp_path):
    """Schedule buffers, EMA bookkeeping and EMA weights (v1-5-pruned), position ids (int64 or float),
    logit scale and a VAE training loss are ignored; the text encoder may lack `text_model.`; the VAE
    attention may be stored as linear [C, C] weights."""
    t = dict(single)
    t.update({"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "posterior_mean_coef1": torch.rand(1000),
              "sqrt_one_minus_alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.num_updates": torch.tensor(3, dtype=torch.int32),
              "model_ema.diffusion_modelout2weight": torch.full_like(t["model.diffusion_model.out.2.weight"], float("nan")),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77.)[None] + 0.4,
              "logit_scale": torch.tensor(4.6), "first_stage_model.loss.logvar": torch.tensor(0.),
              "first_stage_model.loss.discriminator.main.0.weight": torch.rand(8, 3, 4, 4)})
    prefix = "cond_stage_model.transformer.text_model."
    for key in [k for k in t if k.startswith(prefix)]:
        t["cond_stage_model.transformer." + key[len(prefix):]] = t.pop(key)
    q = "first_stage_model.encoder.mid.attn_1.q.weight"
    t[q] = t[q][:, :, 0, 0].clone()
    assert_same_weights(model, minisd.load(write(tmp_path, t)))
    t["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save({"state_dict": t, "global_step": 470000, "epoch": 3}, tmp_path / "m.ckpt")
    assert_same_weights(model, minisd.load(str(tmp_path / "m.ckpt")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_files_load_into_requested_dtype(single, tmp_path, dtype):
    path = write(tmp_path, {k: v.to(dtype) for k, v in single.items()})
    loaded = minisd.load(path, dtype=torch.float32)
    assert loaded.dtype == torch.float32 and all(p.dtype == torch.float32 for p in loaded.parameters())
    assert minisd.load(path, dtype=torch.bfloat16).dtype == torch.bfloat16


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
    ("pickle", "cannot be read weights-only: its pickle needs the Python object"),
    ("garbage_ckpt", "not a readable PyTorch checkpoint"),
    ("truncated_ckpt", "not a readable PyTorch checkpoint, or truncated (PytorchStreamReader"),
    ("empty", "is empty (0 bytes)"),
    ("empty_ckpt", "is empty (0 bytes)"),
    ("bare_tensor", "holds a Tensor, not a state dict"),
    ("list", "holds a list, not a state dict"),
    ("no_tensors", "holds no tensors, so no state dict (entries: 'string_to_token' (dict)"),
    ("same_weight_twice", "holds the weight 'text_model.final_layer_norm.weight' twice "
                          "('cond_stage_model.transformer.text_model.final_layer_norm.weight' and "
                          "'cond_stage_model.transformer.final_layer_norm.weight')"),
    ("int_weight", "'model.diffusion_model.out.2.bias' has dtype torch.int64"),
    ("unbuildable", "cannot be built (num_channels (48) must be divisible by num_groups (32))"),
    ("infer_missing", "missing key 'first_stage_model.encoder.conv_in.weight', needed to tell the architecture"),
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
    elif case == "garbage_ckpt":
        path = str(tmp_path / "x.ckpt")
        open(path, "w").write("hello")
    elif case == "truncated_ckpt":
        torch.save({"state_dict": t}, tmp_path / "full.ckpt")
        data = open(tmp_path / "full.ckpt", "rb").read()
        path = str(tmp_path / "cut.ckpt")
        open(path, "wb").write(data[: len(data) // 2])
    elif case in ("empty", "empty_ckpt"):
        path = str(tmp_path / ("e.safetensors" if case == "empty" else "e.ckpt"))
        open(path, "wb").close()
    elif case in ("bare_tensor", "list", "no_tensors"):
        path = str(tmp_path / "x.pt")
        torch.save({"bare_tensor": torch.zeros(3), "list": [torch.zeros(3)],
                    "no_tensors": {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(1, 768)}}}[case], path)
    elif case == "same_weight_twice":
        t["cond_stage_model.transformer.final_layer_norm.weight"] = t["cond_stage_model.transformer.text_model.final_layer_norm.weight"].clone()
        path = write(tmp_path, t)
    elif case == "int_weight":
        t["model.diffusion_model.out.2.bias"] = t["model.diffusion_model.out.2.bias"].long()
        path = write(tmp_path, t)
    elif case == "unbuildable":   # 48 channels at the first U-Net level: no GroupNorm(32) takes them
        for key in [k for k in t if k.startswith("model.diffusion_model.input_blocks.0.0.")]:
            t[key] = t[key][:48].clone()
        path = write(tmp_path, t)
    elif case == "infer_missing":
        del t["first_stage_model.encoder.conv_in.weight"]
        path = write(tmp_path, t)
    with pytest.raises(MinisdError, match=re.escape(expect)) as e:
        minisd.load(path)
    assert "\n" not in str(e.value) and os.path.basename(path) in str(e.value)


@pytest.mark.parametrize("keys, expect", [
    (["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight",
      "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], "is an SD 2.x checkpoint"),
    (["model.diffusion_model.out.2.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
     "is an SDXL checkpoint"),
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"],
     "is a LoRA adapter, not a model"),
    (["lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"], "is a LoRA adapter, not a model"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "is a LoRA adapter, not a model"),
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"], "is a LoRA adapter"),
    (["model.diffusion_model.input_blocks.1.1.proj_in.lora_A", "model.diffusion_model.input_blocks.1.1.proj_in.lora_B"],
     "is a LoRA adapter, not a model"),
    (["encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight"], "holds a VAE alone"),
    (["input_blocks.0.0.weight", "out.2.weight"], "holds a U-Net alone"),
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "holds a U-Net alone"),
    (["text_model.embeddings.token_embedding.weight"], "holds a text encoder alone"),
    (["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"], "holds a BERT text encoder alone"),
    (["embeddings.word_embeddings.weight", "pooler.dense.weight"], "holds a BERT text encoder alone"),
    (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "is an SD3 checkpoint"),
    (["double_blocks.0.img_attn.qkv.weight"], "is a Flux checkpoint"),
    (["control_model.input_hint_block.0.weight"], "is a ControlNet"),
    (["emb_params"], "is a textual-inversion embedding"),
])
def test_other_models_are_named_for_what_they_are(tmp_path, keys, expect):
    path = write(tmp_path, {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(MinisdError, match=re.escape(expect) + r".* \(key '.+'\); minisd loads whole SD-1\.5 models") as e:
        minisd.load(path)
    assert str(e.value).startswith(path) and any(repr(k) in str(e.value) for k in keys)


@pytest.mark.parametrize("drop, expect", [
    (["vae"], "has no VAE (keys 'first_stage_model.…'); minisd needs"),
    (["text_encoder"], "has no text encoder (keys 'cond_stage_model.transformer.…')"),
    (["vae", "text_encoder"], "has no VAE (keys 'first_stage_model.…') and no text encoder (keys 'cond_stage_model.transformer.…')"),
    (["unet"], "has no U-Net (keys 'model.diffusion_model.…')"),
])
def test_missing_part_is_named_with_its_prefix(single, tmp_path, drop, expect):
    prefixes = tuple(PREFIXES[part] for part in drop)
    path = write(tmp_path, {k: v for k, v in single.items() if not k.startswith(prefixes)})
    with pytest.raises(MinisdError, match=re.escape(expect)):
        minisd.load(path)


def test_inpainting_unet_is_refused(single, tmp_path):
    t = dict(single)
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    t[conv_in] = torch.randn(t[conv_in].shape[0], 9, 3, 3)
    with pytest.raises(MinisdError, match=re.escape("U-Net takes 9 input channels (an inpainting model); "
                                                    "minisd runs text-to-image SD-1.5 with 4")):
        minisd.load(write(tmp_path, t))


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers")
    save_diffusers(model, str(path))
    return path


def configs_only(model, tmp_path, part, **changes):
    """A diffusers folder with config.json files alone (enough for errors found in the configs), one edited."""
    configs = diffusers_configs(model.config)
    configs[part].update(changes)
    for name, config in configs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return str(tmp_path)


@pytest.mark.parametrize("part, changes, expect", [
    ("unet", {"in_channels": 9}, "U-Net takes 9 input channels (an inpainting model); minisd runs text-to-image SD-1.5 with 4"),
    ("unet", {"in_channels": 8}, "U-Net takes 8 input channels (an image-editing (InstructPix2Pix) model)"),
    ("unet", {"out_channels": 8}, "U-Net predicts 8 channels; SD-1.5's predicts the 4 latent channels"),
    ("vae", {"latent_channels": 16}, "VAE has 16 latent channels; SD-1.5's has 4"),
    ("unet", {"cross_attention_dim": 1024}, "U-Net cross-attention takes 1024-wide text features, but the text encoder gives 64"),
    ("text_encoder", {"vocab_size": 1000}, "text encoder has 1000 token embeddings; the CLIP tokenizer needs 49408"),
    ("unet", {"cross_attention_dim": None}, "unet/config.json: lacks 'cross_attention_dim'"),
    ("unet", {"layers_per_block": "2"}, "unet/config.json: 'layers_per_block' is '2', expected a positive integer"),
    ("unet", {"block_out_channels": 64}, "unet/config.json: 'block_out_channels' is 64, expected a list of positive integers"),
    ("unet", {"down_block_types": ["CrossAttnDownBlock2D"]}, "unet/config.json: block_out_channels [64, 128, 128, 128] with"),
    ("unet", {"attention_head_dim": [5, 10, 20, 20]}, "unet/config.json: attention heads [5, 10, 20, 20] are not SD-1.5's"),
    ("unet", {"use_linear_projection": True}, "unet/config.json: U-Net with linear projections (SD 2.x)"),
    ("unet", {"addition_embed_type": "text_time"}, "an SDXL pipeline"),
    ("vae", {"scaling_factor": "0.18215"}, "vae/config.json: 'scaling_factor' is '0.18215', expected a positive finite number"),
    ("text_encoder", {"hidden_size": 64.0}, "text_encoder/config.json: 'hidden_size' is 64.0, expected a positive integer"),
    ("text_encoder", {"hidden_act": "gelu"}, "text_encoder/config.json: hidden_act 'gelu' is not CLIP ViT-L/14's quick_gelu"),
])
def test_diffusers_configs_are_checked(model, tmp_path, part, changes, expect):
    with pytest.raises(MinisdError, match=re.escape(expect)) as e:
        minisd.load(configs_only(model, tmp_path, part, **changes))
    assert str(e.value).startswith(str(tmp_path)) and "\n" not in str(e.value)


def test_unreadable_configs_are_named(model, tmp_path):
    folder = configs_only(model, tmp_path, "unet")
    os.remove(tmp_path / "vae" / "config.json")
    os.makedirs(tmp_path / "vae" / "config.json")
    with pytest.raises(MinisdError, match=re.escape(os.path.join(folder, "vae", "config.json") + ": cannot be read")):
        minisd.load(folder)
    os.rmdir(tmp_path / "vae" / "config.json")
    (tmp_path / "vae" / "config.json").write_text("[1, 2]")
    with pytest.raises(MinisdError, match="vae/config.json: holds a JSON list, expected an object"):
        minisd.load(folder)
    (tmp_path / "vae" / "config.json").write_text("{")
    with pytest.raises(MinisdError, match="vae/config.json: not valid JSON"):
        minisd.load(folder)
    shutil.copy(tmp_path / "unet" / "config.json", tmp_path / "vae" / "config.json")
    os.makedirs(tmp_path / "text_encoder_2")
    with pytest.raises(MinisdError, match="an SDXL pipeline"):
        minisd.load(folder)


@pytest.mark.parametrize("dtype, value", [(torch.float16, float("nan")), (torch.bfloat16, float("inf")),
                                          (torch.float32, float("-inf")), (torch.float64, float("nan"))])
def test_all_finite_equals_isfinite_all(dtype, value):
    """The one-pass min/max check agrees with torch.isfinite(t).all() wherever the bad value sits."""
    g = torch.Generator().manual_seed(0)
    for n in [1, 2, 31, 1000, 65537]:
        t = torch.randn(n, generator=g).to(dtype)
        assert all_finite(t) == bool(torch.isfinite(t).all()) == True   # noqa: E712
        for i in {0, n // 3, n - 1}:
            bad = t.clone()
            bad[i] = value
            assert all_finite(bad) == bool(torch.isfinite(bad).all()) == False   # noqa: E712
    assert all_finite(torch.empty(0, 3))


@pytest.mark.parametrize("value, dtype, expect", [
    (float("nan"), torch.float32, "'model.diffusion_model.middle_block.1.proj_in.weight' holds NaN or infinite values"),
    (float("inf"), torch.float32, "'model.diffusion_model.middle_block.1.proj_in.weight' holds NaN or infinite values"),
    (1e6, torch.float16, "'model.diffusion_model.middle_block.1.proj_in.weight' has values beyond float16 range "
                         "(largest magnitude 1e+06); load the model in float32 or bfloat16"),
])
def test_non_finite_weights_name_the_key(single, tmp_path, value, dtype, expect):
    t = dict(single)
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    t[key] = t[key].clone()
    t[key][3, 1] = value
    path = write(tmp_path, t)
    with pytest.raises(MinisdError, match=re.escape(f"{path}: {expect}")):
        minisd.load(path, dtype=dtype)


def test_non_finite_weight_in_a_diffusers_folder_is_named_as_there(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "d")
    vae = tmp_path / "d" / "vae" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(vae))
    t["decoder.conv_out.bias"][1] = float("nan")
    save_file(t, str(vae))
    with pytest.raises(MinisdError, match=re.escape(f"{vae}: 'decoder.conv_out.bias' holds NaN")):
        minisd.load(str(tmp_path / "d"))


def shard(folder, part, name, n):
    """Split folder/part/name into n shard files and an index.json, as diffusers and transformers write them."""
    tensors = load_file(str(folder / part / name))
    os.remove(folder / part / name)
    stem, weight_map = name[: -len(".safetensors")], {}
    for i in range(n):
        shard_name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        keys = sorted(tensors)[i::n]
        save_file({k: tensors[k] for k in keys}, str(folder / part / shard_name))
        weight_map.update(dict.fromkeys(keys, shard_name))
    (folder / part / (name + ".index.json")).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def test_sharded_diffusers_folder_loads(model, folder, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(folder, d)
    os.rename(d / "unet" / "diffusion_pytorch_model.safetensors", d / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    shard(d, "unet", "diffusion_pytorch_model.fp16.safetensors", 3)
    shard(d, "text_encoder", "model.safetensors", 2)
    assert_same_weights(model, minisd.load(str(d)))
    index = d / "text_encoder" / "model.safetensors.index.json"
    os.remove(d / "text_encoder" / "model-00002-of-00002.safetensors")
    with pytest.raises(MinisdError, match=re.escape(f"{index}: shard file 'model-00002-of-00002.safetensors' is missing")):
        minisd.load(str(d))
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(MinisdError, match=re.escape(f"{index}: no 'weight_map'")):
        minisd.load(str(d))


def test_path_forms_load(model, single, folder, tmp_path, monkeypatch):
    """`~`, a pathlib.Path, an upper-case suffix and a trailing slash, as diffusers' loaders accept them."""
    write(tmp_path, single, "MODEL.SAFETENSORS")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert_same_weights(model, minisd.load(pathlib.Path("~") / "MODEL.SAFETENSORS"))
    assert_same_weights(model, minisd.load(str(folder) + "/"))


@pytest.mark.parametrize("case, expect", [
    ("part_folder", "the unet/ of a diffusers folder; pass the folder itself: {folder}"),
    ("part_file", "one part of a diffusers folder; pass the folder itself: {folder}"),
    ("model_index", "the index of a diffusers folder; pass the folder itself: {folder}"),
    ("folder_holding_a_file", "not a diffusers folder (no unet/); pass a checkpoint file in it instead, e.g. {tmp}/v1-5.safetensors"),
    ("folder_named_like_a_file", "unknown layout: a folder, but neither a diffusers folder"),
    ("other_pipeline", "a StableDiffusion3Pipeline folder without unet/"),
    ("weights_file_is_a_folder", "is a folder, expected a weights file"),
])
def test_file_and_folder_mix_ups_say_what_to_pass(folder, tmp_path, case, expect):
    if case == "part_folder":
        path = folder / "unet"
    elif case == "part_file":
        path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    elif case == "model_index":
        path = folder / "model_index.json"
    elif case == "folder_holding_a_file":
        (tmp_path / "v1-5.safetensors").write_bytes(b"")
        path = tmp_path
    elif case == "folder_named_like_a_file":
        path = tmp_path / "v1-5.safetensors"
        os.makedirs(path)
    elif case == "other_pipeline":
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
        os.makedirs(tmp_path / "transformer")
        path = tmp_path
    elif case == "weights_file_is_a_folder":
        for part in ("unet", "vae", "text_encoder"):
            os.makedirs(tmp_path / part)
            shutil.copy(folder / part / "config.json", tmp_path / part)
        os.makedirs(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
        path = tmp_path
    with pytest.raises(MinisdError, match=re.escape(expect.format(folder=folder, tmp=tmp_path))):
        minisd.load(str(path))


def test_diffusers_folder_errors(model, tmp_path):
    save_diffusers(model, str(tmp_path))
    vae = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(vae))
    tensors["decoder.bogus.weight"] = torch.zeros(1)
    save_file(tensors, str(vae))
    with pytest.raises(MinisdError, match="unexpected key 'decoder.bogus.weight'"):
        minisd.load(str(tmp_path))
    del tensors["decoder.bogus.weight"], tensors["decoder.conv_out.bias"]
    save_file(tensors, str(vae))
    with pytest.raises(MinisdError, match=re.escape(f"{vae}: missing key 'decoder.conv_out.bias'")):
        minisd.load(str(tmp_path))
    os.remove(vae)
    with pytest.raises(MinisdError, match="vae: no weights file"):
        minisd.load(str(tmp_path))
    os.remove(tmp_path / "unet" / "config.json")
    with pytest.raises(MinisdError, match="config.json: missing"):
        minisd.load(str(tmp_path))


def test_old_diffusers_vae_attention_names(model, tmp_path):
    save_diffusers(model, str(tmp_path))
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


def test_sample_script_takes_the_size_of_the_run(tmp_path, monkeypatch):
    """sample.py --run samples at the resolution the run trained (and validated) at, as eval.py --run does."""
    from minisd.adapters import inject, save_adapter
    from helpers import load_script
    run = tmp_path / "runs" / "small"
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"model": "tiny", "data": "phantom", "resolution": 64}))
    sd = minisd.build("tiny")
    inject(sd, "lora", rank=1)
    save_adapter(run / "adapter.safetensors", sd, "lora", 1.0)
    monkeypatch.chdir(tmp_path)
    load_script("sample.py").main(["--run", "small", "--prompt", "lungs", "--steps", "1", "--out", "out"])
    from PIL import Image
    assert Image.open(tmp_path / "out" / "0000-seed0.png").size == (64, 64)
