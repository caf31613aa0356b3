"""Adapters in other tools: kohya and diffusers files read by diffusers' own loaders, a folded checkpoint read by
minisd and by diffusers' from_single_file, and adapter.py's export / fold / info."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minisd
from minisd.checkpoint.names import PREFIXES, to_diffusers_name
from minisd.checkpoint.writing import save_diffusers, save_single_file
from minisd.adapters import adapted_layers, inject, save_adapter
from minisd.errors import MinisdError
from minisd.export import export_diffusers, export_kohya, fold
from helpers import ROOT, load_script, random_model, rel_err

SCALE = 2.0



@pytest.fixture(scope="module")
def base():
    return random_model("tiny")


@pytest.fixture(scope="module")
def adapted(base, tmp_path_factory):
    """(model with a SeLoRA adapter of mixed per-layer ranks 1..4 on every Linear and the 1×1 convs, its file)."""
    sd = copy.deepcopy(base)
    inject(sd, "selora", alpha=SCALE, convs=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapted_layers(sd).values():
            for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
                layer.expand()
            layer.lora_A.copy_(0.05 * torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=g))
    path = tmp_path_factory.mktemp("adapter") / "selora.safetensors"
    save_adapter(path, sd, "selora", alpha=SCALE)
    assert len({layer.rank for layer in adapted_layers(sd).values()}) == 4
    return sd, path


def inputs(sd):
    g = torch.Generator().manual_seed(2)
    ids = sd.tokenizer(["bilateral pleural effusions", "no acute cardiopulmonary disease"])
    return ids, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([5, 900]), torch.randn(2, 77, 64, generator=g)


@torch.no_grad()
def outputs(sd):
    """minisd's text-encoder hidden states and U-Net ε (on a fixed context, so each part is compared alone)."""
    ids, latents, t, ctx = inputs(sd)
    return sd.text_encoder(ids), sd.unet(latents, t, ctx)


@torch.no_grad()
def pipe_outputs(pipe, sd):
    ids, latents, t, ctx = inputs(sd)
    return pipe.text_encoder(ids).last_hidden_state, pipe.unet(latents, t, encoder_hidden_states=ctx).sample


# ------------------------------------------------------------------------------------------------ kohya

def test_kohya_layout(adapted, tmp_path):
    sd, path = adapted
    out = export_kohya(path, tmp_path / "kohya.safetensors")
    tensors = load_file(out)
    layers = adapted_layers(sd)
    assert len(tensors) == 3 * len(layers)
    examples = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj": "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_mid_block_attentions_0_proj_in": "middle_block.1.proj_in",
        "lora_unet_time_embedding_linear_1": "time_embed.0",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "input_blocks.1.0.emb_layers.1",
        "lora_unet_up_blocks_3_resnets_2_time_emb_proj": "output_blocks.11.0.emb_layers.1",
    }
    examples = {k: "model.diffusion_model." + v for k, v in examples.items()}
    examples["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] = \
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    for key, ours in examples.items():
        layer = layers[ours]
        down, up, alpha = (tensors[f"{key}.{kind}"] for kind in ("lora_down.weight", "lora_up.weight", "alpha"))
        conv = key.endswith("proj_in")
        assert down.shape == ((layer.rank, layer.in_features, 1, 1) if conv else (layer.rank, layer.in_features))
        assert up.shape == ((layer.out_features, layer.rank, 1, 1) if conv else (layer.out_features, layer.rank))
        assert alpha.dim() == 0 and alpha.dtype == torch.float32
    # Every layer: alpha / r · up · down (what every kohya reader applies) is the adapter's scale · B A.
    for name, layer in layers.items():
        part = "unet" if name.startswith(PREFIXES["unet"]) else "text_encoder"
        local = name[len(PREFIXES[part]):]
        module = to_diffusers_name(part, local + ".weight", sd.config)[:-len(".weight")]
        key = ("lora_unet_" if part == "unet" else "lora_te_") + module.replace(".", "_")
        down, up = tensors[f"{key}.lora_down.weight"].flatten(1), tensors[f"{key}.lora_up.weight"].flatten(1)
        delta = tensors[f"{key}.alpha"] / down.shape[0] * up.double() @ down.double()
        assert rel_err(delta, SCALE * layer.lora_B.double() @ layer.lora_A.double()) < 1e-6, name
    with safe_open(out, "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


# ------------------------------------------------------------------------------------- diffusers loaders

@pytest.fixture(scope="module")
def diffusers_folder(base, tmp_path_factory):
    """The base model as a diffusers folder (its model_index.json lists the components, which is what
    from_single_file needs to know them from a local config)."""
    folder = tmp_path_factory.mktemp("diffusers")
    save_diffusers(base, str(folder))
    return folder


def scheduler():
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1)


@pytest.fixture
def pipe(diffusers_folder):
    """StableDiffusionPipeline of the base model; no prompt is tokenized here, so it has no tokenizer."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return diffusers.StableDiffusionPipeline(
        unet=diffusers.UNet2DConditionModel.from_pretrained(diffusers_folder / "unet"),
        vae=diffusers.AutoencoderKL.from_pretrained(diffusers_folder / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(diffusers_folder / "text_encoder"),
        tokenizer=None, scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def lora_deltas(pipe):
    """{(part, module path without CLIP's text_model.): scaling · B A} of every peft LoRA layer in the pipeline."""
    deltas = {}
    for part in ("unet", "text_encoder"):
        for name, module in getattr(pipe, part).named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "scaling") and module.lora_A:
                (adapter,) = module.lora_A.keys()
                A, B = module.lora_A[adapter].weight.flatten(1), module.lora_B[adapter].weight.flatten(1)
                deltas[part, name.removeprefix("text_model.")] = module.scaling[adapter] * B.double() @ A.double()
    return deltas


@pytest.mark.parametrize("form", ["kohya", "diffusers folder", "diffusers file"])
def test_diffusers_load_lora_weights_reproduces_minisd(adapted, base, pipe, tmp_path, form):
    sd, path = adapted
    if form == "kohya":
        source = export_kohya(path, tmp_path / "kohya.safetensors")
    elif form == "diffusers folder":
        export_diffusers(path, tmp_path / "lora")
        source = tmp_path / "lora"
        assert os.listdir(source) == ["pytorch_lora_weights.safetensors"]
    else:
        source = export_diffusers(path, tmp_path / "lora.safetensors")
    pipe.load_lora_weights(str(source))

    deltas = lora_deltas(pipe)
    layers = adapted_layers(sd)
    assert len(deltas) == len(layers)
    for name, layer in layers.items():
        part = "unet" if name.startswith(PREFIXES["unet"]) else "text_encoder"
        local = name[len(PREFIXES[part]):]
        module = to_diffusers_name(part, local + ".weight", sd.config)[:-len(".weight")]
        want = layer.scale * layer.lora_B.double() @ layer.lora_A.double()
        assert rel_err(deltas[part, module.removeprefix("text_model.")], want) < 1e-6, name

    ours, theirs = outputs(sd), pipe_outputs(pipe, sd)
    for got, want, without in zip(theirs, ours, outputs(base)):
        assert rel_err(want, without) > 1e-2   # the adapter changes the outputs
        assert rel_err(got, want) < 1e-4


def test_diffusers_metadata_states_exact_ranks(adapted, tmp_path):
    sd, path = adapted
    file = export_diffusers(path, tmp_path / "lora")
    with safe_open(file, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    rank = adapted_layers(sd)["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"].rank
    assert config["unet.rank_pattern"].get(q, config["unet.r"]) == rank
    assert config["unet.alpha_pattern"].get(q, config["unet.lora_alpha"]) == rank   # scale 1: the scale is in lora_B
    assert "encoder.layers.0.self_attn.q_proj" in config["text_encoder.target_modules"]


# ------------------------------------------------------------------------------------------------- fold

@pytest.fixture(scope="module")
def folded(adapted, base, tmp_path_factory):
    _, path = adapted
    out = tmp_path_factory.mktemp("folded") / "model.safetensors"
    fold(copy.deepcopy(base), path, out)
    return out


def test_fold_loads_in_minisd_with_the_adapter_outputs(adapted, folded):
    sd, _ = adapted
    loaded = minisd.load(str(folded))
    assert not adapted_layers(loaded)
    for got, want in zip(outputs(loaded), outputs(sd)):
        assert rel_err(got, want) < 1e-5


def test_fold_fp16(adapted, base, tmp_path):
    sd, path = adapted
    out = fold(copy.deepcopy(base), path, tmp_path / "half.safetensors", torch.float16)
    tensors = load_file(out)
    assert all(t.dtype == torch.float16 for t in tensors.values())
    full = load_file(fold(copy.deepcopy(base), path, tmp_path / "full.safetensors"))
    assert tensors.keys() == full.keys() and all(torch.equal(tensors[k], full[k].half()) for k in tensors)


def test_fold_loads_in_diffusers_from_single_file(adapted, folded, diffusers_folder):
    diffusers = pytest.importorskip("diffusers")
    sd, _ = adapted
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(folded), config=str(diffusers_folder), local_files_only=True, tokenizer=None, scheduler=scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for got, want in zip(pipe_outputs(pipe, sd), outputs(sd)):
        assert rel_err(got, want) < 1e-5


def test_fold_rejects_an_adapter_that_does_not_fit(adapted, base, tmp_path):
    _, path = adapted
    name = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k"
    tensors = load_file(path)
    rank = tensors[f"{name}.lora_A"].shape[0]
    tensors[f"{name}.lora_A"] = torch.zeros(rank, 7)
    with safe_open(path, "pt") as f:
        save_file(tensors, tmp_path / "a.safetensors", metadata=f.metadata())
    with pytest.raises(MinisdError, match=f"layer {name}: lora_A has shape \\[{rank}, 7\\]"):
        fold(copy.deepcopy(base), tmp_path / "a.safetensors", tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------------------------ adapter.py

@pytest.fixture(scope="module")
def cli():
    return load_script("adapter.py").main


def test_cli_export_fold_info(adapted, base, cli, tmp_path, capsys):
    sd, path = adapted
    cli(["export", str(path), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")])
    assert torch.equal(load_file(tmp_path / "k.safetensors")["lora_unet_time_embedding_linear_1.alpha"],
                       load_file(export_kohya(path, tmp_path / "api.safetensors"))["lora_unet_time_embedding_linear_1.alpha"])
    cli(["export", str(path), "--format", "diffusers", "--out", str(tmp_path / "d")])
    assert os.path.exists(tmp_path / "d" / "pytorch_lora_weights.safetensors")

    save_single_file(base, str(tmp_path / "base.safetensors"))
    cli(["fold", "--model", str(tmp_path / "base.safetensors"), "--adapter", str(path),
         "--out", str(tmp_path / "folded.safetensors"), "--dtype", "fp16"])
    folded = minisd.load(str(tmp_path / "folded.safetensors"))
    assert rel_err(outputs(folded)[1], outputs(sd)[1]) < 1e-2   # fp16 weights

    cli(["info", str(path)])
    text = capsys.readouterr().out
    ranks = [layer.rank for layer in adapted_layers(sd).values()]
    assert f"selora adapter, {len(ranks)} layers" in text
    assert f"rank: total {sum(ranks)}, min {min(ranks)}, max {max(ranks)}" in text


@pytest.mark.parametrize("args, message", [
    (["info", "{tmp}/missing.safetensors"], "missing.safetensors: no such adapter file"),
    (["export", "{tmp}/kohya.safetensors", "--format", "diffusers", "--out", "{tmp}/d"],
     "kohya.safetensors: not a minisd adapter file"),
    (["export", "{adapter}", "--format", "kohya", "--out", "{tmp}/lora.ckpt"], "--out {tmp}/lora.ckpt: expected a .safetensors"),
    (["fold", "--model", "tiny", "--adapter", "{tmp}/missing.safetensors", "--out", "{tmp}/m.safetensors"],
     "missing.safetensors: no such adapter file"),
])
def test_cli_bad_input_is_one_line(adapted, cli, tmp_path, capsys, args, message):
    _, path = adapted
    export_kohya(path, tmp_path / "kohya.safetensors")
    args = [a.format(tmp=tmp_path, adapter=path) for a in args]
    with pytest.raises(SystemExit) as e:
        cli(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(tmp=tmp_path) in err


def test_script_runs(adapted):
    _, path = adapted
    run = subprocess.run([sys.executable, os.path.join(ROOT, "adapter.py"), "info", str(path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "selora adapter" in run.stdout
