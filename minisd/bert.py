"""BERT (Devlin et al., 2019) with Hugging Face BertModel's module names, so that its files load as they are.

The encoder of BioBERT and its kin: post-LayerNorm layers, exact GELU, absolute positions, one token type.
No dropout (minisd only runs a frozen or lightly tuned encoder, in inference numerics).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import recompute


@dataclass(frozen=True)
class BertConfig:
    """BERT-base by default; the field names are those of Hugging Face's config.json."""
    vocab_size: int = 28996   # BioBERT-base-cased's vocabulary
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0


def sublayers(**modules):
    """A named group of layers, so that the module tree spells Hugging Face's names (`attention.self.query`)."""
    return nn.ModuleDict(modules)


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids):
        # Positions 0…n-1 and token type 0 for every token: one segment of text.
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]] + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, eps = c.hidden_size, c.layer_norm_eps
        self.heads = c.num_attention_heads
        self.attention = sublayers(self=sublayers(query=nn.Linear(h, h), key=nn.Linear(h, h), value=nn.Linear(h, h)),
                                   output=sublayers(dense=nn.Linear(h, h), LayerNorm=nn.LayerNorm(h, eps=eps)))
        self.intermediate = sublayers(dense=nn.Linear(h, c.intermediate_size))
        self.output = sublayers(dense=nn.Linear(c.intermediate_size, h), LayerNorm=nn.LayerNorm(h, eps=eps))

    def forward(self, x, mask):
        b, n, c = x.shape
        projections = self.attention["self"]
        q, k, v = (projections[p](x).view(b, n, self.heads, c // self.heads).transpose(1, 2) for p in ("query", "key", "value"))
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)
        out = self.attention["output"]
        x = out["LayerNorm"](x + out["dense"](attended))
        return self.output["LayerNorm"](x + self.output["dense"](F.gelu(self.intermediate["dense"](x))))


class BertEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, mask):
        for layer in self.layer:
            x = recompute.run(self, layer, x, mask)
        return x


class BertModel(nn.Module):
    """(ids [B, L], mask [B, L] bool, True = a token, False = padding) -> (last_hidden_state [B, L, hidden],
    pooler_output [B, hidden] = tanh(dense(first token)))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = sublayers(dense=nn.Linear(config.hidden_size, config.hidden_size))

    def forward(self, ids, mask=None):
        x = self.embeddings(ids)
        # Padding is hidden from every query (as keys); padded positions still get outputs, as in BertModel.
        hidden = self.encoder(x, None if mask is None else mask[:, None, None, :])
        return hidden, torch.tanh(self.pooler["dense"](hidden[:, 0]))
