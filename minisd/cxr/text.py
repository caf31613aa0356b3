"""The report encoder: BERT (BioBERT's files) whose pooled summary takes the place of its [CLS] state."""
import torch

from ..bert import BertModel


class ReportEncoder(BertModel):
    """ids [B, L] -> text features [B, L, hidden]: BERT's last hidden states, padding masked out, position 0
    holding the pooler's output. BERT stays frozen but for `trained_parameters()`: the pooler and the last
    layer's two LayerNorms (≈593 K of BERT-base), which adapt its output to the U-Net."""

    def forward(self, ids):
        ids = ids.to(self.embeddings.word_embeddings.weight.device)
        hidden, pooled = super().forward(ids, ids != self.config.pad_token_id)
        return torch.cat([pooled[:, None], hidden[:, 1:]], dim=1)

    def trained_parameters(self):
        """{name: parameter} of what from-scratch training updates in the text encoder."""
        last = f"encoder.layer.{self.config.num_hidden_layers - 1}."
        trained = ("pooler.", last + "attention.output.LayerNorm.", last + "output.LayerNorm.")
        return {name: p for name, p in self.named_parameters() if name.startswith(trained)}
