"""Writing SD-1.5 as an original-layout single file or as a diffusers folder that diffusers opens as a pipeline."""
import json
import os

from ..files import atomic_json, atomic_text
from .files import atomic_save
from .names import DIFFUSERS_FILES, PREFIXES, to_diffusers_name


def save_single_file(model, path, dtype=None):
    """The whole model as an original-layout single file (what other SD tools open)."""
    tensors = {PREFIXES[part] + k: (v.to(dtype) if dtype else v).cpu()
               for part, module in model.parts().items() for k, v in module.state_dict().items()}
    atomic_save(tensors, path)


def diffusers_configs(config):
    u, v, t = config.unet, config.vae, config.text
    down = ["CrossAttnDownBlock2D" if i in u.attention_levels else "DownBlock2D" for i in range(len(u.channel_mult))]
    up = ["CrossAttnUpBlock2D" if i in u.attention_levels else "UpBlock2D" for i in reversed(range(len(u.channel_mult)))]
    return {
        "unet": {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": u.in_channels,
                 "out_channels": u.out_channels, "down_block_types": down, "up_block_types": up,
                 "mid_block_type": "UNetMidBlock2DCrossAttn",
                 "block_out_channels": [u.model_channels * m for m in u.channel_mult],
                 "layers_per_block": u.num_res_blocks, "attention_head_dim": u.num_heads,
                 "cross_attention_dim": u.context_dim, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
                 "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
                 "mid_block_scale_factor": 1, "use_linear_projection": False},
        "vae": {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult), "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult),
                "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
                "latent_channels": v.z_channels, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 512,
                "scaling_factor": v.scaling_factor},
        "text_encoder": {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": t.width,
                         "intermediate_size": t.mlp_width, "num_attention_heads": t.heads, "num_hidden_layers": t.layers,
                         "max_position_embeddings": t.max_positions, "vocab_size": t.vocab_size, "hidden_act": "quick_gelu",
                         "layer_norm_eps": 1e-5, "projection_dim": t.width, "bos_token_id": 49406, "eos_token_id": 49407,
                         "pad_token_id": 49407},
    }


def diffusers_state_dict(model, part, dtype=None):
    """One part's tensors under diffusers' names and shapes."""
    tensors = {}
    for name, value in model.parts()[part].state_dict().items():
        if part == "vae" and ".attn_1." in name and value.dim() == 4:
            value = value[:, :, 0, 0]   # diffusers keeps the VAE attention as linear layers
        tensors[to_diffusers_name(part, name, model.config)] = value.to(dtype) if dtype else value
    return tensors


def save_diffusers(model, folder, dtype=None):
    """The whole model as a diffusers folder (unet/, vae/, text_encoder/ with config.json each)."""
    configs = diffusers_configs(model.config)
    for part in model.parts():
        os.makedirs(os.path.join(folder, part), exist_ok=True)
        tensors = {name: value.cpu() for name, value in diffusers_state_dict(model, part, dtype).items()}
        atomic_save(tensors, os.path.join(folder, part, DIFFUSERS_FILES[part][0]))
        atomic_json(configs[part], os.path.join(folder, part, "config.json"))
    write_pipeline_files(model, folder)


def write_pipeline_files(model, folder):
    """Tokenizer, scheduler and model_index.json, so that the folder opens as a whole pipeline."""
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    atomic_text(json.dumps(model.tokenizer.encoder), os.path.join(folder, "tokenizer", "vocab.json"))
    atomic_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in model.tokenizer.ranks) + "\n",
                os.path.join(folder, "tokenizer", "merges.txt"))
    atomic_json({"model_max_length": model.config.text.max_positions, "pad_token": "<|endoftext|>",
                 "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
                os.path.join(folder, "tokenizer", "tokenizer_config.json"))
    write_scheduler(model.schedule, folder)
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    atomic_json(index, os.path.join(folder, "model_index.json"))


def write_scheduler(schedule, folder):
    """scheduler/scheduler_config.json: diffusers' DDIMScheduler set up as minisd samples (ε-prediction, 1000
    training steps, ᾱ_0 after the last step, no clipping)."""
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    atomic_json({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": schedule.beta_start,
                 "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule, "clip_sample": False,
                 "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"},
                os.path.join(folder, "scheduler", "scheduler_config.json"))
