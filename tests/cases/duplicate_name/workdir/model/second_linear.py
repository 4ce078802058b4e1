"""A model plugin that reuses the built-in name `linear`: registration must be refused."""

from runner.core.models import ProteinModel, register_model
from torch import nn


@register_model("linear")
class AnotherLinear(ProteinModel):
    def __init__(self, seq_len, in_dim, n_outputs=1):
        super().__init__(seq_len, in_dim, n_outputs)
        self.fc = nn.Linear(seq_len * in_dim, n_outputs)

    def forward(self, x):
        return self._out(self.fc(x.flatten(1)))
