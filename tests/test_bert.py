"""minisd's BERT and WordPiece tokenizer equal transformers' on the same files: both weight formats, the
prefixed and TensorFlow-era names real BERT files carry, and report-like text."""
import json
import warnings

import pytest
import torch

from minisd.checkpoint.bert import read_bert_folder
from minisd.cxr.text import ReportEncoder
from minisd.errors import MinisdError
from minisd.wordpiece import WordPieceTokenizer, builtin_vocab

transformers = pytest.importorskip("transformers")
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy  # noqa: E402

# Cased pieces of radiology reports, on top of the character-level vocabulary (every ASCII text tokenizes).
WORDS = ["The", "the", "heart", "is", "normal", "in", "size", "Heart", "lung", "##s", "are", "clear", "No", "no",
         "pneumo", "##thorax", "pleural", "effusion", "XXXX", "XX", "##XX", "cm", "mm", "nodule", "right", "left",
         "upper", "lobe", "of", "and", "with", "1", "2", "12", "##3", "##.", "year", "old", "female", "male", "é"]
REPORTS = [
    "The heart is normal in size. The lungs are clear.",
    "XXXX-year-old female with XXXX. No pneumothorax/effusion; 12.3 cm nodule (right upper lobe), 4mm.",
    "Heart size: normal!? Lungs: clear... [XXXX] {XXXX} 100% #3 a/b\\c",
    "",
    "  \t odd\x00 spacing\n\n and CAPS, accents: café, naïve, Ünïcödé, 日本, 🙂",
    "The lungs are clear. " * 30,   # over-long: truncated, keeping [SEP]
]
LENGTH = 48


def write_vocab(folder, lowercase=None):
    vocab = builtin_vocab()
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)), encoding="utf-8")
    if lowercase is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    return vocab


def random_bert(vocab_size, seed=0):
    """A small random transformers BertModel whose every weight (LayerNorms included) is off its init."""
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=LENGTH)
    torch.manual_seed(seed)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def as_pretraining_file(state):
    """The names of a BertForPreTraining file converted from TensorFlow: `bert.` prefix, LayerNorm gamma/beta,
    and the pre-training heads alongside."""
    renamed = {"bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in state.items()}
    renamed["cls.predictions.bias"] = torch.zeros(3)
    renamed["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    return renamed


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin"])
def test_bert_equals_transformers_bert_model(tmp_path, layout):
    folder = tmp_path / "bert"
    vocab = write_vocab(folder)
    hf = random_bert(len(vocab))
    if layout == "model.safetensors":
        hf.save_pretrained(folder)
    else:
        hf.config.save_pretrained(folder)
        torch.save(as_pretraining_file(hf.state_dict()), folder / layout)
    assert sorted(p.name for p in folder.iterdir() if "model" in p.name) == [layout]
    bert = read_bert_folder(folder)
    ours = ReportEncoder(bert.config)
    ours.load_state_dict(bert.tensors)

    ids = WordPieceTokenizer(bert.vocab, LENGTH)(REPORTS[:3])
    mask = ids != 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long())
        hidden, pooled = super(ReportEncoder, ours).forward(ids, mask)
        features = ours(ids)
    assert (hidden - ref.last_hidden_state).abs().max() < 1e-5
    assert (pooled - ref.pooler_output).abs().max() < 1e-5
    # The report encoder's features: the pooled summary first, then BERT's states of the other positions.
    assert torch.equal(features[:, 0], pooled) and torch.equal(features[:, 1:], hidden[:, 1:])


@pytest.mark.parametrize("lowercase", [None, False, True])
def test_wordpiece_ids_equal_bert_tokenizer(tmp_path, lowercase):
    """Both of transformers' BertTokenizers: the `tokenizers`-backed one and the original Python one."""
    random_bert(len(write_vocab(tmp_path, lowercase))).save_pretrained(tmp_path)
    tokenizer = read_bert_folder(tmp_path).tokenizer(LENGTH, "vocab.txt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tokenizer(REPORTS)
    cased = not lowercase   # cased unless tokenizer_config.json says otherwise (BioBERT is cased)
    for reference in (transformers.BertTokenizer, BertTokenizerLegacy):
        tokenizer = reference(str(tmp_path / "vocab.txt"), do_lower_case=not cased)
        expected = tokenizer(REPORTS, padding="max_length", truncation=True, max_length=LENGTH)["input_ids"]
        assert ours.tolist() == expected, reference.__name__
    assert ours[-1, -1] == tokenizer.sep_token_id and (ours[3, 2:] == tokenizer.pad_token_id).all()
    too_long = sum(len(ids) > LENGTH for ids in tokenizer(REPORTS)["input_ids"])
    assert too_long and [str(w.message) for w in caught] == [f"{too_long} prompt(s) longer than {LENGTH} tokens were truncated"]


def test_an_uncased_vocabulary_lowercases_when_the_folder_does_not_say(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "heart", "is", "normal", ".", "x", "##x"]
    random_bert(len(vocab)).save_pretrained(tmp_path)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    ours = read_bert_folder(tmp_path).tokenizer(12, "vocab.txt")(["The HEART is Normal. XXXX"])
    reference = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)
    assert ours.tolist() == reference(["The HEART is Normal. XXXX"], padding="max_length", max_length=12)["input_ids"]
    assert 1 not in ours.tolist()[0]   # no [UNK]


@pytest.mark.parametrize("config, vocab, message", [
    ({"model_type": "roberta"}, None, "model_type 'roberta'; minisd's BERT has model_type 'bert'"),
    ({"hidden_act": "relu"}, None, "hidden_act 'relu'"),
    ({"num_attention_heads": 5}, None, "hidden_size 32 does not split into 5 heads"),
    ({"hidden_size": None}, None, "lacks 'hidden_size'"),
    ({}, ["[PAD]", "[UNK]", "[CLS]", "hello"], r"lacks the special token\(s\) \[SEP\]"),
    ({"vocab_size": 10}, None, "more than the 10 embeddings"),
])
def test_bad_bert_folders_are_one_line(tmp_path, config, vocab, message):
    hf = random_bert(len(write_vocab(tmp_path)))
    hf.save_pretrained(tmp_path)
    c = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**c, **config}))
    if vocab:
        (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    with pytest.raises(MinisdError, match=message):
        read_bert_folder(tmp_path).tokenizer(LENGTH, "vocab.txt")
