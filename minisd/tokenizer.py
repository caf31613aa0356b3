"""CLIP byte-pair tokenizer with SD-1.5's padding (49407) and truncation, reading open_clip's BPE file."""
import functools
import gzip
import importlib.util
import os
import warnings

import ftfy
import regex
import torch

START, END = 49406, 49407
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def default_bpe_path():
    """The vocabulary shipped inside open-clip-torch (found without importing the package)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open-clip-torch is needed for its CLIP vocabulary: pip install open-clip-torch")
    return os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode():
    """Reversible map from the 256 bytes to printable characters, as CLIP's BPE expects."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class Tokenizer:
    """tokenizer(prompts) -> LongTensor [B, 77]: <start> tokens… <end>, padded with <end>."""

    def __init__(self, bpe_path=None, length=77):
        with gzip.open(bpe_path or default_bpe_path(), "rt", encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.length = length

    @functools.lru_cache(maxsize=65536)
    def bpe(self, word):
        if word in ("<|startoftext|>", "<|endoftext|>"):
            return (word,)
        parts = tuple(word[:-1]) + (word[-1] + "</w>",)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return parts

    def encode(self, text):
        """Token ids of one prompt without start/end tokens (text cleaned as Hugging Face's CLIPTokenizer)."""
        text = regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
        ids = []
        for word in PATTERN.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(word))
        return ids

    def __call__(self, prompts):
        ids, truncated = self.tokenize(prompts)
        if truncated:
            warnings.warn(f"{truncated} prompt(s) longer than {self.length} tokens were truncated", stacklevel=2)
        return ids

    def tokenize(self, prompts):
        """([N, length] token ids, how many prompts were truncated to fit), without a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows, truncated = [], 0
        for prompt in prompts:
            ids = self.encode(prompt)
            if len(ids) > self.length - 2:
                truncated += 1
                ids = ids[: self.length - 2]
            rows.append([START] + ids + [END] * (self.length - 1 - len(ids)))
        return torch.tensor(rows, dtype=torch.long), truncated
