"""The chest-X-ray LDM: the paper's sizes, its own schedule in sampling, its folder written and read back
(parts that transformers and diffusers open), a BERT folder as its text encoder, and adapters on it."""
import json
import warnings

import pytest
import torch

import minisd
from minisd import adapters
from minisd.checkpoint.cxr import save_cxr_folder
from minisd.cxr.config import CXRConfig
from minisd.cxr.model import CXRLatentDiffusion
from minisd.cxr.unet import CXRUNet
from minisd.cxr.vae import CXRVAE
from minisd.errors import MinisdError
from minisd.export import export_kohya, fold
from minisd.sampling import alphas_cumprod, ddim_sample, initial_latents
from helpers import random_model

# The paper's counts: VAE 3.25 M, U-Net 39.66 M, BioBERT's trainable part 593 K.
PAPER = {"vae": 3.25e6, "unet": 39.66e6, "text encoder (trained)": 593e3}


def count(parameters):
    return sum(p.numel() for p in parameters)


def test_cxr_ldm_parameter_counts_are_the_papers():
    with torch.device("meta"):
        # BioBERT-base's vocabulary, as after load("cxr-ldm", text_encoder=BIOBERT); the trained part is the same.
        sd = CXRLatentDiffusion(CXRConfig())
    counts = {"vae": count(sd.vae.parameters()), "unet": count(sd.unet.parameters()),
              "text encoder (trained)": count(sd.text_encoder.trained_parameters().values())}
    for name, n in counts.items():
        print(f"cxr-ldm {name}: {n:,} parameters, paper {PAPER[name]:,.0f} ({n / PAPER[name] - 1:+.1%})")
        assert abs(n / PAPER[name] - 1) < 0.05, name
    assert count(sd.text_encoder.parameters()) == 108_310_272   # BERT-base-cased (BioBERT v1.1)


@pytest.mark.parametrize("size", [128, pytest.param(256, marks=pytest.mark.slow)])
def test_cxr_ldm_shapes(size):
    """Grayscale images -> latents of 8 channels at 1/8 the size (256×256 -> 32×32×8) -> the U-Net's ε of the
    same shape, given 768-wide features of 128 tokens -> images again."""
    config = CXRConfig()
    vae, unet = CXRVAE(config.vae).eval(), CXRUNet(config).eval()
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode(image)
        eps = unet(mean, torch.tensor([999]), torch.randn(1, 128, 768))
        decoded = vae.decode(mean)
    assert mean.shape == logvar.shape == eps.shape == (1, 8, size // 8, size // 8)
    assert decoded.shape == (1, 3, size, size)


def test_vae_takes_three_equal_channels_as_one_and_gives_three():
    sd = random_model("cxr-tiny")
    gray = torch.rand(2, 1, 64, 48) * 2 - 1
    with torch.no_grad():
        one, three = sd.vae.encode(gray)[0], sd.vae.encode(gray.repeat(1, 3, 1, 1))[0]
        image = sd.vae.decode(one)
    assert torch.allclose(one, three, atol=1e-6) and one.shape == (2, 8, 8, 6)
    assert image.shape == (2, 3, 64, 48) and torch.equal(image[:, 0], image[:, 2])


def test_sampling_uses_the_models_schedule():
    """One DDIM step by hand with the linear β 1e-4 → 0.02 schedule: ddim_sample gives the same image."""
    pytest.importorskip("diffusers")
    from diffusers import DDPMScheduler
    sd = random_model("cxr-tiny")
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ac = alphas_cumprod(sd.schedule)
    assert (ac - reference.alphas_cumprod).abs().max() < 1e-6
    assert (ac - alphas_cumprod()).abs().max() > 0.1   # not SD-1.5's

    image = ddim_sample(sd, ["Small right pleural effusion."], steps=1, guidance=1.0, height=32, width=32, seed=4,
                        progress=False)
    with torch.no_grad():
        z = initial_latents(1, 32, 32, seed=4, channels=8)
        eps = sd.unet(z, torch.tensor([1]), sd.text_encoder(sd.tokenizer(["Small right pleural effusion."])))
        x0 = (z - (1 - ac[1]).sqrt() * eps) / ac[1].sqrt()
        z = ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * eps
        expected = ((sd.vae.decode(z / sd.vae.scaling_factor) + 1) / 2).clamp(0, 1)
    assert (image - expected).abs().max() < 1e-5


def test_cxr_folder_round_trip(tmp_path):
    """Written and read back: the same model; its text encoder a Hugging Face BERT folder that transformers'
    BertModel and BertTokenizer open, its schedule diffusers' DDIMScheduler config."""
    transformers = pytest.importorskip("transformers")
    diffusers = pytest.importorskip("diffusers")
    sd = random_model("cxr-tiny", seed=3)
    save_cxr_folder(sd, tmp_path)
    loaded = minisd.load(tmp_path)
    assert isinstance(loaded, CXRLatentDiffusion) and loaded.config == sd.config
    for part, module in sd.parts().items():
        other = getattr(loaded, part).state_dict()
        assert all(torch.equal(value, other[name]) for name, value in module.state_dict().items()), part

    prompts = ["XXXX-year-old male. The heart is normal in size.", ""]
    ids = loaded.tokenizer(prompts)
    assert torch.equal(ids, sd.tokenizer(prompts))
    reference_tokenizer = transformers.BertTokenizer.from_pretrained(tmp_path / "text_encoder")
    assert ids.tolist() == reference_tokenizer(prompts, padding="max_length", truncation=True,
                                               max_length=sd.config.max_length)["input_ids"]
    bert = transformers.BertModel.from_pretrained(tmp_path / "text_encoder").eval()
    with torch.no_grad():
        features = loaded.text_encoder(ids)
        reference = bert(input_ids=ids, attention_mask=(ids != 0).long())
    assert (features[:, 1:] - reference.last_hidden_state[:, 1:]).abs().max() < 1e-5
    assert (features[:, 0] - reference.pooler_output).abs().max() < 1e-5

    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert (scheduler.alphas_cumprod - alphas_cumprod(loaded.schedule)).abs().max() < 1e-6
    assert minisd.load(tmp_path, dtype=torch.float16).dtype == torch.float16


def test_an_interrupted_folder_is_named(tmp_path):
    save_cxr_folder(minisd.build("cxr-tiny"), tmp_path)
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(MinisdError, match="without its model_index.json, which is written last"):
        minisd.load(tmp_path)


@pytest.fixture
def bert_folder(tmp_path):
    """A small random Hugging Face BERT (BertModel.save_pretrained) with a cased vocabulary of its own."""
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "The", "heart", "is", "normal", ".", "##s", "lung"]
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=96, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return tmp_path / "bert", transformers.BertModel.from_pretrained(tmp_path / "bert").eval()


def test_a_bert_folder_becomes_the_text_encoder(bert_folder):
    folder, reference = bert_folder
    sd = minisd.load("cxr-tiny", text_encoder=folder)
    ids = sd.tokenizer(["The heart is normal. lungs"])
    assert ids[0, :8].tolist() == [2, 5, 6, 7, 8, 9, 11, 10] and sd.unet.context_proj.in_features == 48
    with torch.no_grad():
        features = sd.text_encoder(ids)
        expected = reference(input_ids=ids, attention_mask=(ids != 0).long())
        eps = sd.unet(torch.randn(1, 8, 4, 4), torch.tensor([10]), features)
    assert (features[:, 1:] - expected.last_hidden_state[:, 1:]).abs().max() < 1e-5
    assert eps.shape == (1, 8, 4, 4)


def test_a_bert_file_without_pooler_gets_a_random_one(bert_folder):
    from safetensors.torch import load_file, save_file
    folder, _ = bert_folder
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, folder / "model.safetensors")
    with pytest.warns(UserWarning, match="no pooler weights; the pooler starts random"):
        minisd.load("cxr-tiny", text_encoder=folder)


def test_text_encoder_is_refused_for_sd15(bert_folder):
    with pytest.raises(MinisdError, match="is an SD-1.5 model"):
        minisd.load("tiny", text_encoder=bert_folder[0])


def test_a_bert_folder_is_not_a_model(bert_folder):
    with pytest.raises(MinisdError, match="a BERT text encoder alone, not a whole model"):
        minisd.load(bert_folder[0])


def test_selora_goes_into_every_linear_layer_and_trains(tmp_path):
    """inject() as for SD-1.5: every nn.Linear of the U-Net and the text encoder, forward and backward, Fisher
    terms and growth; the adapter file loads back onto a fresh base."""
    sd = random_model("cxr-tiny")
    linears = {part: sum(isinstance(m, torch.nn.Linear) for m in getattr(sd, part).modules()) for part in ("unet", "text_encoder")}
    summary = adapters.inject(sd, "selora")
    assert summary["layers"] == linears
    layers = adapters.adapted_layers(sd)
    for layer in layers.values():
        layer.track_fisher = True
    ids = sd.tokenizer(["The heart is normal in size.", "Moderate left pneumothorax."])
    eps = sd.unet(torch.randn(2, 8, 8, 8), torch.tensor([10, 900]), sd.text_encoder(ids))
    eps.square().mean().backward()
    assert all(layer.lora_A.grad is not None and layer.fisher_ratio() >= 1 for layer in layers.values())
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
        layer.expand()

    adapters.save_adapter(tmp_path / "adapter.safetensors", sd, "selora", 1.0)
    fresh = random_model("cxr-tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the same base: no fingerprint warning
        adapters.load_adapter(fresh, tmp_path / "adapter.safetensors")
    with torch.no_grad():
        context = torch.randn(1, sd.config.max_length, 64)
        x = torch.randn(1, 8, 8, 8)
        assert (sd.unet(x, torch.tensor([3]), context) - fresh.unet(x, torch.tensor([3]), context)).abs().max() < 1e-5
        assert (sd.text_encoder(ids) - fresh.text_encoder(ids)).abs().max() < 1e-5
    # SD-1.5's own formats refuse it rather than write names no SD tool could place.
    with pytest.raises(MinisdError, match="is not a layer of the SD-1.5 U-Net"):
        export_kohya(tmp_path / "adapter.safetensors", tmp_path / "kohya.safetensors")
    with pytest.raises(MinisdError, match="is not an SD-1.5 model"):
        fold(random_model("cxr-tiny"), tmp_path / "adapter.safetensors", tmp_path / "folded.safetensors")


def test_selora_injects_into_the_full_size_model():
    with torch.device("meta"):
        sd = CXRLatentDiffusion(CXRConfig())
        summary = adapters.inject(sd, "selora")
    # U-Net: time embedding 2, context projection 1, res blocks 8 × 1, attention blocks 7 × 8; BERT: 12 × 6, pooler 1.
    assert summary["layers"] == {"unet": 67, "text_encoder": 73}
    names = list(adapters.adapted_layers(sd))
    assert "model.diffusion_model.context_proj" in names
    assert "cond_stage_model.transformer.encoder.layer.11.attention.self.query" in names


@pytest.mark.parametrize("file, key", [("scheduler/scheduler_config.json", "beta_end"), ("vae/config.json", "scaling_factor")])
def test_an_infinite_setting_is_named(tmp_path, file, key):
    save_cxr_folder(minisd.build("cxr-tiny"), tmp_path)
    config = json.loads((tmp_path / file).read_text())
    (tmp_path / file).write_text(json.dumps({**config, key: float("inf")}))   # JSON's Infinity, which Python reads
    with pytest.raises(MinisdError, match=f"'{key}' is inf, expected a positive finite number"):   # was: NaN images
        minisd.load(tmp_path)
