"""A small self-attention model: every residue attends to every other, so distant sites can interact.

Registered as `tiny_attention`. Use it with any embedding:

    {"model": {"name": "tiny_attention", "params": {"d_model": 32, "n_layers": 1}}}
"""

import torch
from torch import nn

from runner.core.models import ProteinModel, register_model


@register_model("tiny_attention")
class TinyAttention(ProteinModel):
    """Embedded variants `[B, L, C]` → linear projection + learned positions → Transformer encoder → score.

    The head reads both the mean over positions and a per-position summary, because the effect of a
    substitution depends on where it is.
    """

    def __init__(
        self,
        seq_len: int,
        in_dim: int,
        n_outputs: int = 1,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 1,
        dropout: float = 0.1,
    ):
        super().__init__(seq_len, in_dim, n_outputs)
        self.proj = nn.Linear(in_dim, d_model)
        self.positions = nn.Parameter(torch.zeros(seq_len, d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=2 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.per_position = nn.Linear(d_model, 1)
        self.head = nn.Linear(d_model + seq_len, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.proj(x) + self.positions)
        summary = torch.cat([h.mean(dim=1), self.per_position(h).squeeze(-1)], dim=1)
        return self._out(self.head(summary))
