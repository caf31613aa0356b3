"""Hugging Face BERT folders (BioBERT's layout): config.json, model.safetensors or pytorch_model.bin (read with
torch.load(weights_only=True)), vocab.txt and optionally tokenizer_config.json — read into minisd's BERT and
WordPiece tokenizer, and written so that transformers' BertModel and BertTokenizer open them."""
import os
import re
from dataclasses import asdict, dataclass, fields

from ..bert import BertConfig
from ..errors import MinisdError
from ..wordpiece import WordPieceTokenizer
from .configs import NUMBER, POSITIVE, setting
from ..files import atomic_json, atomic_text
from .files import atomic_save, first_line, read_json, read_tensors, shard_files
from .reading import resolve_hub_id

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HUB_FILES = ["config.json", "vocab.txt", "tokenizer_config.json", *WEIGHTS]
LAYOUT = "a BERT folder holds config.json, vocab.txt and model.safetensors or pytorch_model.bin"
# What BERT files hold besides the encoder: the pre-training heads (masked LM, next sentence) and position ids.
EXTRAS = re.compile(r"^cls\.|(^|\.)position_ids$")
NON_NEGATIVE = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative integer")
FLAG = (lambda v: isinstance(v, bool), "true or false")
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings")


@dataclass
class BertFolder:
    config: BertConfig
    weights: str                 # the file (or shard index) to name in messages
    tensors: dict                # {BertModel name: tensor}
    vocab: dict                  # {token: id}
    tokenizer_settings: dict     # do_lower_case, strip_accents, model_max_length as tokenizer_config.json gives them

    def tokenizer(self, length, source):
        return WordPieceTokenizer(self.vocab, length, lowercase=self.tokenizer_settings["do_lower_case"],
                                  strip_accents=self.tokenizer_settings["strip_accents"], source=source)


def bert_config(folder):
    path = os.path.join(folder, "config.json")
    c = read_json(path, LAYOUT)
    for key, wanted in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
        if c.get(key, wanted) != wanted:
            raise MinisdError(f"{path}: {key} {c[key]!r}; minisd's BERT has {key} {wanted!r}")
    kinds = {"layer_norm_eps": NUMBER, "pad_token_id": NON_NEGATIVE}
    values = {f.name: setting(c, path, f.name, kinds.get(f.name, POSITIVE), *(() if f.name in REQUIRED else (f.default,)))
              for f in fields(BertConfig)}
    config = BertConfig(**values)
    if config.hidden_size % config.num_attention_heads:
        raise MinisdError(f"{path}: hidden_size {config.hidden_size} does not split into {config.num_attention_heads} heads")
    if config.pad_token_id >= config.vocab_size:
        raise MinisdError(f"{path}: pad_token_id {config.pad_token_id} is beyond vocab_size {config.vocab_size}")
    return config


def bert_name(key):
    """BertModel's name of a weight: BertFor…'s files add `bert.`, files converted from TensorFlow say gamma/beta."""
    key = key.removeprefix("bert.")
    return re.sub(r"(LayerNorm)\.gamma$", r"\1.weight", re.sub(r"(LayerNorm)\.beta$", r"\1.bias", key))


def bert_weights(folder):
    """(file to name in messages, {BertModel name: tensor}) of a BERT folder, pre-training heads left out."""
    for name in WEIGHTS:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            origin, files = path, [path]
            break
        if os.path.exists(path + ".index.json"):
            origin, files = path + ".index.json", shard_files(path + ".index.json")
            break
    else:
        raise MinisdError(f"{folder}: no BERT weights ({LAYOUT})")
    tensors = {}
    for path in files:
        for key, value in read_tensors(path).items():
            if EXTRAS.search(key):
                continue
            name = bert_name(key)
            if name in tensors:
                raise MinisdError(f"{path}: {key!r} holds the same weight as another key ({name!r})")
            tensors[name] = value
    return origin, tensors


def read_vocab(path):
    """vocab.txt: one token a line, its id the line's index (as BertTokenizer reads it)."""
    try:
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f.readlines())}
    except FileNotFoundError:
        raise MinisdError(f"{path}: missing ({LAYOUT})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MinisdError(f"{path}: cannot be read as UTF-8 text ({getattr(e, 'strerror', None) or first_line(e)})") from None
    if not vocab:
        raise MinisdError(f"{path}: is empty, expected one token a line")
    return vocab


def tokenizer_settings(folder, vocab):
    """tokenizer_config.json's casing and length. Where it does not say, the vocabulary tells: an uncased one has
    no capital letters outside its [SPECIAL] tokens (BioBERT's is cased)."""
    path = os.path.join(folder, "tokenizer_config.json")
    c = read_json(path, "") if os.path.exists(path) else {}
    strip_accents = c.get("strip_accents")
    if strip_accents is not None and not isinstance(strip_accents, bool):
        raise MinisdError(f"{path}: 'strip_accents' is {strip_accents!r}, expected true, false or null")
    cased = any(token != token.lower() for token in vocab if not (token.startswith("[") and token.endswith("]")))
    return {"do_lower_case": setting(c, path, "do_lower_case", FLAG, not cased), "strip_accents": strip_accents,
            "model_max_length": c.get("model_max_length")}


def read_bert_folder(source):
    """A local BERT folder, or a hub id (the huggingface cache first, then a download)."""
    source = os.path.expanduser(os.fspath(source))
    if not os.path.isdir(source):
        if os.path.exists(source) or not re.fullmatch(r"[\w.-]+/[\w.-]+", source) or source.startswith((".", "/")):
            raise MinisdError(f"{source}: not a folder; the text encoder is a BERT folder ({LAYOUT}) or a hub id")
        source = resolve_hub_id(source, HUB_FILES, "a BERT folder (config.json, vocab.txt, model.safetensors)")
    config = bert_config(source)
    vocab_path = os.path.join(source, "vocab.txt")
    vocab = read_vocab(vocab_path)
    if max(vocab.values()) >= config.vocab_size:
        raise MinisdError(f"{vocab_path}: has {max(vocab.values()) + 1} tokens, more than the {config.vocab_size} "
                          f"embeddings of {os.path.join(source, 'config.json')}")
    return BertFolder(config, *bert_weights(source), vocab, tokenizer_settings(source, vocab))


def save_bert_folder(encoder, tokenizer, folder, dtype=None):
    """A BERT encoder and its tokenizer as a Hugging Face folder (BertModel's names, no `bert.` prefix)."""
    os.makedirs(folder, exist_ok=True)
    atomic_save({k: (v.to(dtype) if dtype else v).cpu() for k, v in encoder.state_dict().items()},
                os.path.join(folder, WEIGHTS[0]), metadata={"format": "pt"})
    atomic_json({"architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
                 "position_embedding_type": "absolute", **asdict(encoder.config)}, os.path.join(folder, "config.json"))
    atomic_text("".join(token + "\n" for token in sorted(tokenizer.vocab, key=tokenizer.vocab.get)),
                os.path.join(folder, "vocab.txt"))
    atomic_json({"tokenizer_class": "BertTokenizer", "do_lower_case": tokenizer.lowercase,
                 "strip_accents": tokenizer.strip_accents, "model_max_length": tokenizer.length},
                os.path.join(folder, "tokenizer_config.json"))
