"""BERT's WordPiece tokenizer (the `tokenizers` library): BertTokenizer's text cleaning and splitting, cased
unless told otherwise, `[CLS] … [SEP]` truncated to a fixed length and padded with `[PAD]`."""
import string
import warnings

import torch
from tokenizers import BertWordPieceTokenizer

from .errors import MinisdError

NEEDED = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def builtin_vocab():
    """A small cased vocabulary for models with random weights: the special tokens, every printable ASCII
    character and its word-continuation piece, so any ASCII text tokenizes (one token per character)."""
    chars = [c for c in string.printable if not c.isspace()]
    return {token: i for i, token in enumerate([*NEEDED, "[MASK]", *chars, *("##" + c for c in chars)])}


class WordPieceTokenizer:
    """tokenizer(prompts) -> LongTensor [B, length]: [CLS] pieces… [SEP], then [PAD]; longer text is cut
    (with one warning per call) so that [SEP] stays."""

    def __init__(self, vocab, length, lowercase=False, strip_accents=None, source="the vocabulary"):
        missing = [token for token in NEEDED if token not in vocab]
        if missing:
            raise MinisdError(f"{source}: lacks the special token(s) {', '.join(missing)} that BERT's input needs")
        self.vocab, self.length, self.lowercase, self.strip_accents = vocab, length, lowercase, strip_accents
        self.pad_id = vocab["[PAD]"]
        self.backend = BertWordPieceTokenizer(vocab, lowercase=lowercase, strip_accents=strip_accents,
                                              clean_text=True, handle_chinese_chars=True)
        self.backend.enable_truncation(length)
        self.backend.enable_padding(length=length, pad_id=self.pad_id, pad_token="[PAD]")

    def __call__(self, prompts):
        ids, truncated = self.tokenize(prompts)
        if truncated:
            warnings.warn(f"{truncated} prompt(s) longer than {self.length} tokens were truncated", stacklevel=2)
        return ids

    def tokenize(self, prompts):
        """([N, length] token ids, how many prompts were truncated to fit), without a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        # One at a time: encode_batch's thread pool would make every later fork (data loader workers) warn.
        encodings = [self.backend.encode(prompt) for prompt in prompts]
        return torch.tensor([e.ids for e in encodings], dtype=torch.long), sum(bool(e.overflowing) for e in encodings)
