"""Telling what a file or folder is when it is not a model minisd loads: another model family, an adapter,
one part of a model alone, or one part of a diffusers folder — each named in one line with what to pass instead."""
import os
import re

from ..errors import MinisdError
from .files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, read_json
from .names import PREFIXES


# Files that are not an SD-1.5 checkpoint, told by their keys: the first rule that some key matches names
# the file. OTHER_MODELS never match an SD-1.5 key; PARTS_ALONE apply when no key has an SD-1.5 prefix.
OTHER_MODELS = [
    (r"^lora_(unet|te\d?)_|\.(lora_down|lora_up|lora_A|lora_B)(\.weight)?$|_lora\.(down|up)\.weight$|\.(hada_w1_a|lokr_w1)$",
     "is a LoRA adapter, not a model"),
    (r"^conditioner\.embedders\.", "is an SDXL checkpoint"),
    (r"^cond_stage_model\.model\.", "is an SD 2.x checkpoint with an OpenCLIP text encoder"),
    (r"^(model\.diffusion_model\.)?joint_blocks\.", "is an SD3 checkpoint"),
    (r"^(model\.diffusion_model\.)?double_blocks\.", "is a Flux checkpoint"),
    (r"^control_model\.|^controlnet_", "is a ControlNet, not a base model"),
    (r"^emb_params$", "is a textual-inversion embedding, not a model"),
]
PARTS_ALONE = [
    (r"^(encoder|decoder|quant_conv|post_quant_conv)\.", "holds a VAE alone"),
    (r"^(input_blocks|middle_block|output_blocks|time_embed|down_blocks|mid_block|up_blocks|time_embedding|conv_in)\.",
     "holds a U-Net alone"),
    (r"^(transformer\.)?text_model\.|^embeddings\.token_embedding\.", "holds a text encoder alone"),
    (r"^(bert\.)?embeddings\.word_embeddings\.", "holds a BERT text encoder alone"),
]


def name_other_models(keys, path):
    """A file that is another model, an adapter or one part alone is named for what it is."""
    keys = list(keys)
    has_sd15_part = any(k.startswith(tuple(PREFIXES.values())) for k in keys)
    for pattern, what in OTHER_MODELS + ([] if has_sd15_part else PARTS_ALONE):
        key = next((k for k in keys if re.search(pattern, k)), None)
        if key is not None:
            raise MinisdError(f"{path}: {what} (key {key!r}); minisd loads whole SD-1.5 models (U-Net, VAE and text encoder)")


def diffusers_root(folder):
    """The diffusers folder whose unet/, vae/ or text_encoder/ (with its config.json) `folder` is, or None."""
    folder = os.path.abspath(folder)
    root = os.path.dirname(folder)
    if os.path.basename(folder) in PREFIXES and os.path.isfile(os.path.join(folder, "config.json")) \
            and os.path.isdir(os.path.join(root, "unet")):
        return root
    return None


def not_a_diffusers_folder(folder):
    """One line saying what a folder without unet/ is, and what to pass instead."""
    folder = os.path.abspath(folder)
    if diffusers_root(folder):
        return f"{folder}: the {os.path.basename(folder)}/ of a diffusers folder; pass the folder itself: {diffusers_root(folder)}"
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config) and read_json(config, "").get("model_type") == "bert":
        return f"{folder}: a BERT text encoder alone, not a whole model (a chest-X-ray LDM takes it as its text encoder)"
    index = os.path.join(folder, "model_index.json")
    if os.path.isfile(index):
        pipeline = read_json(index, "").get("_class_name", "pipeline")
        return f"{folder}: a {pipeline} folder without unet/; minisd loads SD-1.5 (unet/, vae/ and text_encoder/)"
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES))
    if files:
        return f"{folder}: not a diffusers folder (no unet/); pass a checkpoint file in it instead, e.g. {os.path.join(folder, files[0])}"
    return f"{folder}: unknown layout: a folder, but neither a diffusers folder (unet/, vae/, text_encoder/) nor one holding a checkpoint file"
