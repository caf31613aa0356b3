"""Token ids equal Hugging Face's CLIPTokenizer built from the same BPE file, with SD-1.5 padding."""
import gzip
import json

import pytest

from minisd.tokenizer import END, START, Tokenizer, default_bpe_path

PROMPTS = [
    "a photo of a cat",
    "",
    "The heart is normal in size. The mediastinum is unremarkable. XXXX XXXX are clear. No pneumothorax or effusion.",
    "!!!...???,,,;;; (a) [b] {c} 'quoted' \"dq\" — dash–em 1,234.5% #hash @at $5 ^&* C++ x-ray's 3.0cm/2mm",
    "  Multiple   spaces\tand\nnewlines, UPPER case, café naïve 日本語 emoji 🙂  ",
    "lung " * 100,
    "it's they're we've I'm you'll he'd",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("clip_bpe")
    ours = Tokenizer()
    with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    (root / "vocab.json").write_text(json.dumps(ours.encoder))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_hugging_face(hf_tokenizer, prompt):
    ours = Tokenizer()([prompt])
    theirs = hf_tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.tolist() == theirs.tolist()


def test_padding_and_truncation_keep_the_end_token():
    tok = Tokenizer()
    ids = tok(["a", ""])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == START and (ids[0, 2:] == END).all()
    assert ids[1, 0] == START and (ids[1, 1:] == END).all()
    with pytest.warns(UserWarning, match="1 prompt.*truncated"):
        long = tok(["lung " * 100, "short"])
    assert long[0, 0] == START and long[0, -1] == END and (long[0, 1:-1] != END).all()


def test_no_warning_for_exactly_75_tokens(recwarn):
    Tokenizer()(["a " * 75])
    assert not [w for w in recwarn if "truncated" in str(w.message)]
