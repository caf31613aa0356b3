"""The model equals diffusers' and transformers' on the same weights, written in both checkpoint layouts."""

import pytest
import torch

import minisd
from minisd.checkpoint.configs import infer_config
from minisd.checkpoint.names import PREFIXES
from minisd.checkpoint.reading import split_single_file
from minisd.checkpoint.writing import save_diffusers, save_single_file
from minisd.config import CONFIGS
from helpers import rel_err, random_model

TOL = 1e-4


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A random tiny model saved as a single file and as a diffusers folder."""
    root = tmp_path_factory.mktemp("ckpt")
    sd = random_model("tiny")
    save_single_file(sd, str(root / "model.safetensors"))
    save_diffusers(sd, str(root / "diffusers"))
    return sd, root


@pytest.fixture(scope="module")
def reference(written):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    _, root = written
    folder = root / "diffusers"
    return {
        "unet": diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        "vae": diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval(),
        "text_encoder": transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
    }


@pytest.fixture(scope="module", params=["single", "diffusers"])
def loaded(request, written):
    _, root = written
    path = root / ("model.safetensors" if request.param == "single" else "diffusers")
    return minisd.load(str(path))


def test_loaded_weights_equal_written(written, loaded):
    sd, _ = written
    assert loaded.config == sd.config
    for (name, a), (_, b) in zip(sd.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("size", [32, 28])
@torch.no_grad()
def test_unet_matches_diffusers(loaded, reference, size):
    g = torch.Generator().manual_seed(size)
    x = torch.randn(2, 4, size, size, generator=g)
    t = torch.tensor([3, 777])
    ctx = torch.randn(2, 77, loaded.config.unet.context_dim, generator=g)
    ours = loaded.unet(x, t, ctx)
    theirs = reference["unet"](x, t, encoder_hidden_states=ctx).sample
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(loaded, reference):
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, logvar = loaded.vae.encode(x)
    dist = reference["vae"].encode(x).latent_dist
    assert rel_err(mean, dist.mean) < TOL and rel_err(logvar, dist.logvar) < TOL
    z = torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(1))
    assert rel_err(loaded.vae.decode(z), reference["vae"].decode(z).sample) < TOL


@torch.no_grad()
def test_text_encoder_matches_transformers(loaded, reference):
    ids = loaded.tokenizer(["a chest x-ray with a small left pleural effusion", ""])
    ours = loaded.text_encoder(ids)
    theirs = reference["text_encoder"](ids).last_hidden_state
    assert ours.shape == (2, 77, loaded.config.text.width)
    assert rel_err(ours, theirs) < TOL


@pytest.mark.slow
@torch.no_grad()
def test_full_size_sd15_matches_reference(tmp_path):
    """The exact sd15 config, random weights, against diffusers and transformers."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    sd = random_model("sd15")
    save_diffusers(sd, str(tmp_path))
    assert minisd.load(str(tmp_path)).config == CONFIGS["sd15"]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 4, 28, 28, generator=g), torch.tensor([500]), torch.randn(1, 77, 768, generator=g)
    unet = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert rel_err(sd.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) < TOL
    del unet
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    assert rel_err(sd.vae.encode(img)[0], vae.encode(img).latent_dist.mean) < TOL
    assert rel_err(sd.vae.decode(sd.vae.encode(img)[0]), vae.decode(vae.encode(img).latent_dist.mean).sample) < TOL
    del vae
    text = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder").eval()
    ids = sd.tokenizer(["a chest x-ray"])
    assert rel_err(sd.text_encoder(ids), text(ids).last_hidden_state) < TOL


def test_sd15_config_is_sd15():
    u, v, t = CONFIGS["sd15"].unet, CONFIGS["sd15"].vae, CONFIGS["sd15"].text
    assert (u.model_channels, u.channel_mult, u.num_res_blocks, u.attention_levels, u.num_heads, u.context_dim) == \
        (320, (1, 2, 4, 4), 2, (0, 1, 2), 8, 768)
    assert (v.ch, v.ch_mult, v.num_res_blocks, v.z_channels, v.scaling_factor) == (128, (1, 2, 4, 4), 2, 4, 0.18215)
    assert (t.width, t.layers, t.heads, t.mlp_width, t.max_positions, t.vocab_size) == (768, 12, 12, 3072, 77, 49408)


def test_sd15_module_names_are_the_original_checkpoints():
    with torch.device("meta"):
        sd = minisd.StableDiffusion(CONFIGS["sd15"])
    unet, vae, text = sd.unet.state_dict(), sd.vae.state_dict(), sd.text_encoder.state_dict()
    for key in ["time_embed.0.weight", "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.3.0.op.weight", "input_blocks.11.0.out_layers.3.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.1.proj_out.weight", "input_blocks.4.0.skip_connection.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight", "out.2.bias"]:
        assert key in unet, key
    assert unet["input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (2560, 320)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in unet
    for key in ["encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight", "encoder.down.2.downsample.conv.weight",
                "encoder.mid.attn_1.q.weight", "decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight",
                "decoder.up.0.block.0.nin_shortcut.weight", "quant_conv.weight", "post_quant_conv.weight"]:
        assert key in vae, key
    assert vae["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "text_model.encoder.layers.11.mlp.fc2.weight" in text and "text_model.final_layer_norm.weight" in text


def test_sd15_architecture_is_read_off_an_original_file():
    """The shapes of a full-size original single file (meta tensors: no memory) give back the sd15 config."""
    with torch.device("meta"):
        sd = minisd.StableDiffusion(CONFIGS["sd15"])
    tensors = {PREFIXES[part] + k: v for part, m in sd.parts().items() for k, v in m.state_dict().items()}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77, dtype=torch.long)
    tensors["alphas_cumprod"] = torch.zeros(1000)
    parts = split_single_file(tensors, "v1-5-pruned-emaonly.safetensors")
    assert infer_config(parts) == CONFIGS["sd15"]


@pytest.fixture(scope="module", params=["safetensors", "bin", "sharded"])
def saved_by_diffusers(request, written, reference, tmp_path_factory):
    """The reference modules saved by diffusers' StableDiffusionPipeline.save_pretrained, as a user's folder is."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    ours = written[1] / "diffusers"
    pipe = diffusers.StableDiffusionPipeline(
        vae=reference["vae"], text_encoder=reference["text_encoder"], unet=reference["unet"],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(ours / "tokenizer"),
        scheduler=diffusers.DDIMScheduler.from_pretrained(ours / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp(request.param)
    options = {"safe_serialization": request.param != "bin"}
    if request.param == "sharded":
        options["max_shard_size"] = "300KB"
    pipe.save_pretrained(folder, **options)
    return request.param, folder


def test_folders_saved_by_diffusers_load_exactly(written, saved_by_diffusers):
    kind, folder = saved_by_diffusers
    if kind == "sharded":
        assert len(list(folder.glob("*/*.index.json"))) == 3
    loaded = minisd.load(folder)
    sd, _ = written
    assert loaded.config == sd.config
    for (name, a), (_, b) in zip(sd.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
