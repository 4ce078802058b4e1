"""Model registry and the built-in models.

Every model is a `ProteinModel`: an `nn.Module` built as `factory(seq_len=L, in_dim=C,
n_outputs=K, **params)` whose `forward(x)` takes the embedded batch `[B, L, C]` and returns `[B]`
(regression, K = 1) or `[B, K]` class logits. `penalty()` may return an extra loss term (e.g. the
ridge L2 of the linear model) that training adds to the loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from runner.core.registry import ParamError, Registry

log = logging.getLogger(__name__)

MODELS: Registry[nn.Module] = Registry("model")


def register_model(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register a model factory (usually a `ProteinModel` subclass) under `name`; also a decorator."""
    return MODELS.register(name, factory)


class ProteinModel(nn.Module):
    """Base class: embedded variants `[B, L, C]` in, one score `[B]` or `[B, n_outputs]` logits out."""

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1):
        super().__init__()
        self.seq_len = int(seq_len)
        self.in_dim = int(in_dim)
        self.n_outputs = int(n_outputs)

    def penalty(self) -> torch.Tensor | None:
        """Extra loss term added in training (None: nothing)."""
        return None

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-1) if self.n_outputs == 1 else y


@register_model("linear")
class LinearModel(ProteinModel):
    """Ridge-style linear model on the flattened embedding (the ProteinGym one-hot baseline).

    `l2` is the ridge penalty on the weights (sum of squares, scaled by 1/n_features so the
    default suits any length). `lr_scale` reparameterises the weights so Adam's per-step move is
    `lr * lr_scale`: a linear model on thousands of sparse one-hot features needs far larger steps
    than a deep model at the same plan-level learning rate.
    """

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1, l2: float = 1.0, lr_scale: float = 10.0):
        super().__init__(seq_len, in_dim, n_outputs)
        n_features = self.seq_len * self.in_dim
        self.l2 = float(l2)
        self.lr_scale = float(lr_scale)
        self.weight = nn.Parameter(torch.zeros(n_features, n_outputs))
        self.bias = nn.Parameter(torch.zeros(n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.lr_scale
        return self._out(x.flatten(1) @ w.to(x.dtype) + self.bias * self.lr_scale)

    def penalty(self) -> torch.Tensor:
        w = self.weight * self.lr_scale
        return self.l2 * w.pow(2).sum() / w.shape[0]


class InputNorm(nn.Module):
    """Per-feature batch normalisation of the flattened embedding (no learned scale or shift).

    Why: positions that never vary in a data set (GB1 mutates 4 of 56) are constant one-hot
    columns. Un-normalised, each of their first-layer weights acts as one more bias that Adam moves
    at the full learning rate, so the layer's bias effectively trains ~50x too fast and the
    predictions jitter; normalised, constant columns are exactly zero. Measured on GB1 (MLP, raw
    target, plain loop): test Spearman 0.562 without it, 0.607-0.620 with it (3 seeds). A batch of
    one row (the last of an epoch) uses the running statistics instead of its own.
    """

    def __init__(self, n_features: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(n_features))
        self.register_buffer("running_var", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training and x.shape[0] > 1
        return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, training=batch_stats,
                                              momentum=self.momentum, eps=self.eps)


@register_model("mlp")
class MLPModel(ProteinModel):
    """Fully connected network on the flattened embedding: captures interactions between sites.

    `input_norm` ("batch" or "none") normalises each input feature first (see `InputNorm`).
    """

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1, hidden: list[int] | int = (512, 256),
                 dropout: float = 0.1, input_norm: str = "batch"):
        super().__init__(seq_len, in_dim, n_outputs)
        if input_norm not in ("batch", "none"):
            raise ParamError(f"model.params.input_norm: must be 'batch' or 'none', not {input_norm!r}")
        sizes = [hidden] if isinstance(hidden, int) else list(hidden)
        width = self.seq_len * self.in_dim
        layers: list[nn.Module] = [InputNorm(width)] if input_norm == "batch" else []
        for size in sizes:
            layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(size)
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(self.net(x.flatten(1).float()))


@register_model("cnn")
class CNNModel(ProteinModel):
    """1-D convolutions over the sequence, then a position-aware dense head.

    Convolutions see each residue in its local context; the head keeps the position (a few
    channels per position, flattened) because the effect of a substitution depends on where it is.
    """

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1, channels: int = 32, kernel_size: int = 5,
                 n_layers: int = 2, head_channels: int = 8, hidden: int = 64, dropout: float = 0.1,
                 linear_skip: bool = True, l2: float = 1.0):
        super().__init__(seq_len, in_dim, n_outputs)
        # wide-and-deep: a ridge term per (position, residue) plus the convolutional part for context
        self.linear = LinearModel(seq_len, in_dim, n_outputs, l2=l2) if linear_skip else None
        convs: list[nn.Module] = []
        width = self.in_dim
        for _ in range(int(n_layers)):
            convs += [nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            width = channels
        convs += [nn.Conv1d(width, head_channels, 1), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.head = nn.Sequential(
            nn.Flatten(1), nn.Dropout(dropout), nn.Linear(head_channels * self.seq_len, hidden), nn.ReLU(),
            nn.Linear(hidden, n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._out(self.head(self.convs(x.transpose(1, 2))))
        return y if self.linear is None else y + self.linear(x)

    def penalty(self) -> torch.Tensor | None:
        return None if self.linear is None else self.linear.penalty()


def create_model(name: str, seq_len: int, in_dim: int, n_outputs: int, params: dict | None = None) -> nn.Module:
    """Build the named model; it must be an `nn.Module` (a `ProteinModel` for the built-ins)."""
    MODELS.check_params(name, params or {}, "model.params", fixed=("seq_len", "in_dim", "n_outputs"))
    model = MODELS.get(name)(seq_len=seq_len, in_dim=in_dim, n_outputs=n_outputs, **(params or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


