"""Model registry and the built-in models.

Every model is a `ProteinModel`: an `nn.Module` built as `factory(seq_len=L, in_dim=C,
n_outputs=K, **params)` whose `forward(x)` takes the embedded batch `[B, L, C]` and returns `[B]`
(regression, K = 1) or `[B, K]` class logits. `penalty()` may return an extra loss term (e.g. the
ridge L2 of the linear model) that training adds to the loss.

A model may also define `fit_closed_form(train, val)`: training calls it once before any
gradient step with the training (and validation) rows, as re-iterable chunks of embedded batches
(see `ChunkSource`). `ridge` is fitted entirely there (it has no trainable parameters, so training
takes one pass and stops); `mlp`, `cnn` and `ge` fit their additive ridge part there and learn the
rest by gradient descent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from runner.core.registry import ParamError, Registry

log = logging.getLogger(__name__)

MODELS: Registry[nn.Module] = Registry("model")

# A re-iterable source of `(x [B, L, C] embedded, y [B])` chunks: each call starts a fresh pass.
ChunkSource = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


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

    # True when the model before its first gradient step is already a fitted model (a closed-form
    # part, the learned part starting at zero): the validation pass before training then makes that
    # start a checkpoint candidate like any epoch (runner.core.selection). A random start is not one.
    fitted_start = False
    # what that start is, in the run's account of the kept model (metrics.json `kept.why`, the plot)
    start_name = "fitted start"

    def penalty(self) -> torch.Tensor | None:
        """Extra loss term added in training (None: nothing)."""
        return None

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-1) if self.n_outputs == 1 else y


# ---------------------------------------------------------------------------------------------
# closed-form ridge regression


COARSE_ALPHAS = tuple(10.0**k for k in range(-2, 6))  # then refined by half a decade around the best
MAX_GRAM = 20_000  # largest d×d (primal) or n×n (dual) system solved: 20k² float64 is 3.2 GB
VARYING = 1e-12  # a feature whose training variance is at most this never varies
SAMPLE_ROWS = 2048  # training rows a network's data-dependent initialisation looks at


def _spearman(y: torch.Tensor, p: torch.Tensor) -> float:
    """Spearman (average ranks for ties) of two 1-D tensors; NaN when either is constant."""
    from runner.core.metrics import spearman

    return spearman(y.double().cpu().numpy(), p.double().cpu().numpy())


class ClosedFormTooLarge(ParamError):
    """More training rows and varying features than `RidgeFit` solves (MAX_GRAM of either)."""

    def __init__(self, n_rows: int, n_features: int):
        self.n_rows, self.n_features = n_rows, n_features
        super().__init__(
            f"model 'ridge': {n_rows} training rows and {n_features} varying features is past the closed-form "
            f"limit ({MAX_GRAM} of either); use model 'linear' (gradient descent) instead"
        )


class RidgeFit:
    """Streaming closed-form ridge on flattened features, the regularisation chosen on validation rows.

    Only the columns that vary in the training rows enter the solve (GB1's one-hot has 1,400
    columns of which 80 vary); features are centred on the training mean and never scaled, so a
    column seen once in training is not amplified (the failure of per-feature standardisation).
    Each alpha is one Cholesky solve in float64 on the CPU, of the d×d normal equations or, with
    fewer rows than varying columns, of the n×n kernel (the dual). Alpha: the best validation
    Spearman (ties: the larger alpha) over decades 1e-2…1e5, then half a decade either side of the
    best; or exactly `alphas` when given, or `alpha`. Without validation rows: generalised
    cross-validation on the training rows.
    """

    def __init__(self, alphas: Iterable[float] | None = None, alpha: float | None = None):
        grid = [alpha] if alpha is not None else (None if alphas is None else list(alphas))
        if grid is not None and (
            not grid or any(not isinstance(a, int | float) or not math.isfinite(a) or a <= 0 for a in grid)
        ):
            raise ParamError(f"model.params: ridge alpha(s) must be positive numbers, not {grid!r}")
        self.grid = None if grid is None else sorted(float(a) for a in grid)
        self.report: dict = {}

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double().cpu()

    def fit(self, train: ChunkSource, val: ChunkSource | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return `(weight [d], bias [], column_mean [d])` for the flattened features (float64, CPU).

        In a study slot, points on the same data, split and embedding share one fit
        (`runner.core.shared.cached_fit`: the same deterministic computation, done once)."""
        from runner.core.shared import cached_fit

        settings = {"ridge": self.grid, "val": val is not None}
        weight, bias, mean, self.report = cached_fit(settings, lambda: (*self._fit(train, val), self.report))
        return weight.clone(), bias.clone(), mean.clone()

    def _fit(self, train: ChunkSource, val: ChunkSource | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, total, total_sq, y_sum = 0, None, None, 0.0
        for x, y in train():
            f = self._flat(x)
            total = f.sum(0) if total is None else total + f.sum(0)
            total_sq = (f * f).sum(0) if total_sq is None else total_sq + (f * f).sum(0)
            y_sum += float(y.double().sum())
            n += len(f)
        if n == 0:
            raise ValueError("ridge: no training rows")
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0)
        cols = torch.nonzero(var > 1e-12 * (1 + mean.abs())).squeeze(1)
        y_mean = y_sum / n
        d = len(cols)
        weight = torch.zeros_like(mean)
        if d == 0:  # nothing varies: predict the training mean
            self.report = {"alpha": None, "n_features": 0}
            return weight, torch.tensor(y_mean, dtype=torch.float64), mean
        if min(n, d) > MAX_GRAM:
            raise ClosedFormTooLarge(n, d)
        primal = d <= n
        system = torch.zeros(d, d, dtype=torch.float64) if primal else None
        rhs = torch.zeros(d, dtype=torch.float64) if primal else None
        rows, targets = [], []
        for x, y in train():
            f = self._flat(x)[:, cols] - mean[cols]
            yc = y.double().cpu() - y_mean
            if primal:
                system += f.T @ f
                rhs += f.T @ yc
            else:
                rows.append(f)
                targets.append(yc)
        if not primal:
            xc, rhs = torch.cat(rows), torch.cat(targets)
            system = xc @ xc.T
        # LAPACK through scipy: on a loaded CPU torch's cholesky_solve with one right-hand side took
        # longer than the factorisation itself
        from scipy.linalg import cho_factor, cho_solve

        system_np, rhs_np = system.numpy(), rhs.numpy()
        diag = np.arange(len(rhs_np))
        y_sq = float(sum((y.double().cpu() - y_mean).pow(2).sum() for _, y in train())) if val is None else 0.0
        val_rows = [(self._flat(x)[:, cols] - mean[cols], y.double().cpu()) for x, y in val()] if val else []

        def solve(alpha: float) -> tuple[torch.Tensor, float]:
            shifted = system_np.copy()
            shifted[diag, diag] += alpha
            factor = cho_factor(shifted, lower=True, overwrite_a=True, check_finite=False)
            sol_np = cho_solve(factor, rhs_np, check_finite=False)
            sol = torch.from_numpy(sol_np)
            w = sol if primal else xc.T @ sol
            if val_rows:
                pred = torch.cat([f @ w for f, _ in val_rows]) + y_mean
                return w, _spearman(torch.cat([y for _, y in val_rows]), pred)
            # generalised cross-validation: RSS / (1 - df/n)^2, df = trace of the hat matrix
            inverse_trace = float(np.trace(cho_solve(factor, np.eye(len(rhs_np)), check_finite=False)))
            df = len(rhs_np) - alpha * inverse_trace
            fitted = system @ sol  # primal: X'X w; dual: X X' a = the fitted values
            rss = y_sq - 2 * float(sol @ rhs) + float(sol @ fitted) if primal else float((rhs - fitted).pow(2).sum())
            return w, -max(rss, 0.0) / max(1 - df / n, 1e-9) ** 2

        how = (
            "fixed"
            if self.grid is not None and len(self.grid) == 1
            else ("validation Spearman" if val_rows else "generalised cross-validation")
        )
        tried: dict[float, tuple[torch.Tensor, float]] = {}
        for a in self.grid or COARSE_ALPHAS:
            tried[a] = solve(a)
        if self.grid is None and len(tried) > 1:
            best = self._pick(tried)
            for a in (best / 10**0.5, best * 10**0.5):
                tried[a] = solve(a)
        best = self._pick(tried)
        w = tried[best][0]
        weight[cols] = w
        bias = torch.tensor(y_mean, dtype=torch.float64) - (mean[cols] * w).sum()
        self.report = {
            "alpha": best,
            "chosen_by": how,
            "n_features": d,
            "n_rows": n,
            "solve": "primal" if primal else "dual",
            "scores": {f"{a:.4g}": round(s, 5) for a, (_, s) in sorted(tried.items())},
        }
        log.info(
            "ridge: alpha %.4g by %s (%d varying of %d features, %d rows, %s); score by alpha: %s",
            best,
            how,
            d,
            len(mean),
            n,
            self.report["solve"],
            "  ".join(f"{a} {v}" for a, v in self.report["scores"].items()),
        )
        return weight, bias, mean

    @staticmethod
    def _pick(tried: dict[float, tuple[torch.Tensor, float]]) -> float:
        scores = {a: (s if math.isfinite(s) else -math.inf) for a, (_, s) in tried.items()}
        top = max(scores.values())
        # the largest alpha among the best: the most regularised of equal fits
        return max(a for a, s in scores.items() if s >= top - 1e-12)


class RidgeHead(nn.Module):
    """`x.flatten(1) @ weight + bias` with the weight from `RidgeFit` (buffers: not trained by SGD)."""

    def __init__(self, n_features: int, alphas: Iterable[float] | None = None, alpha: float | None = None):
        super().__init__()
        self.fitter = RidgeFit(alphas, alpha)
        self.register_buffer("weight", torch.zeros(n_features))
        self.register_buffer("bias", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(n_features))  # the training mean of every feature

    def fit(self, train: ChunkSource, val: ChunkSource | None) -> None:
        weight, bias, mean = self.fitter.fit(train, val)
        self.weight.copy_(weight.to(self.weight))
        self.bias.copy_(bias.to(self.bias))
        self.mean.copy_(mean.to(self.mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() @ self.weight.float() + self.bias.float()


def _regression_only(name: str, n_outputs: int) -> None:
    if n_outputs != 1:
        raise ParamError(
            f"model {name!r} is a regression model (data.target DMS_score); for classes use 'linear', 'mlp' or 'cnn'"
        )


def _check_base(base: str, n_outputs: int) -> bool:
    """Whether to fit a ridge base: `base` is "ridge" or "none"; classification never has one."""
    if base not in ("ridge", "none"):
        raise ParamError(f"model.params.base: must be 'ridge' or 'none', not {base!r}")
    return base == "ridge" and n_outputs == 1


@register_model("ridge")
class RidgeModel(ProteinModel):
    """Closed-form ridge regression on the flattened embedding (ProteinGym's one-hot baseline).

    No gradient descent: the weights are solved exactly (`RidgeFit`) with the regularisation chosen
    on the validation rows by Spearman (`RidgeFit`; `alphas`: an explicit grid, `alpha`: a fixed
    value). Seconds on 150k variants. The reference the other built-ins are calibrated against.
    """

    def __init__(
        self,
        seq_len: int,
        in_dim: int,
        n_outputs: int = 1,
        alphas: list[float] | None = None,
        alpha: float | None = None,
    ):
        super().__init__(seq_len, in_dim, n_outputs)
        _regression_only("ridge", n_outputs)
        self.ridge = RidgeHead(self.seq_len * self.in_dim, alphas, alpha)

    def fit_closed_form(self, train: ChunkSource, val: ChunkSource | None) -> None:
        self.ridge.fit(train, val)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ridge(x)


@register_model("linear")
class LinearModel(ProteinModel):
    """Ridge-style linear model on the flattened embedding, trained by gradient descent.

    `l2` is the ridge penalty on the weights (sum of squares, scaled by 1/n_features so the
    default suits any length). `lr_scale` reparameterises the weights so Adam's per-step move is
    `lr * lr_scale`: a linear model on thousands of sparse one-hot features needs far larger steps
    than a deep model at the same plan-level learning rate. `init`: "ridge" (regression's default)
    starts the weights at the exact ridge fit (`RidgeFit`, alpha on validation), and that start is
    a checkpoint candidate like `mlp`'s, so a fixed `l2` that suits the data set worse than ridge's
    chosen alpha cannot leave `linear` below `ridge` (Bgl3: 0.034 below when it started at zero);
    "zero" starts at zero, as classification always does. Past ridge's closed-form size limit the
    start is zero too (logged). `ridge` solves the model exactly; `linear` is for classification,
    feature sets past that limit, and refining the fit by gradient descent.
    """

    start_name = "ridge fit"

    def __init__(
        self,
        seq_len: int,
        in_dim: int,
        n_outputs: int = 1,
        l2: float = 1.0,
        lr_scale: float = 10.0,
        init: str = "ridge",
    ):
        super().__init__(seq_len, in_dim, n_outputs)
        if init not in ("ridge", "zero"):
            raise ParamError(f"model.params.init: must be 'ridge' or 'zero', not {init!r}")
        n_features = self.seq_len * self.in_dim
        self.l2 = float(l2)
        self.lr_scale = float(lr_scale)
        self.init = init if n_outputs == 1 else "zero"
        self.weight = nn.Parameter(torch.zeros(n_features, n_outputs))
        self.bias = nn.Parameter(torch.zeros(n_outputs))
        # saved with the weights: a resumed run (which calls fit_closed_form again) keeps its trained
        # weights, and still knows whether its start was the ridge fit
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ridge_start", torch.zeros((), dtype=torch.bool))

    @property
    def fitted_start(self) -> bool:  # type: ignore[override]
        return bool(self.ridge_start)

    def fit_closed_form(self, train: ChunkSource, val: ChunkSource | None) -> None:
        if self.init != "ridge" or bool(self.initialised):
            return
        self.initialised.fill_(True)
        try:
            weight, bias, _ = RidgeFit().fit(train, val)
        except ClosedFormTooLarge as exc:
            log.warning(
                "linear: no ridge start: %d training rows and %d varying features are past the closed-form "
                "limit (%d of either); starting from zero",
                exc.n_rows,
                exc.n_features,
                MAX_GRAM,
            )
            return
        with torch.no_grad():
            self.weight.copy_((weight / self.lr_scale).to(self.weight)[:, None])
            self.bias.fill_(float(bias) / self.lr_scale)
        self.ridge_start.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before the ridge start existed: trained already, and not from a ridge start
        state_dict.setdefault(prefix + "initialised", torch.ones((), dtype=torch.bool))
        state_dict.setdefault(prefix + "ridge_start", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.lr_scale
        return self._out(x.flatten(1) @ w.to(x.dtype) + self.bias * self.lr_scale)

    def penalty(self) -> torch.Tensor:
        w = self.weight * self.lr_scale
        return self.l2 * w.pow(2).sum() / w.shape[0]


class FeatureMean(nn.Module):
    """Centres the flattened embedding on its training mean (fixed once, before training).

    Why: positions that never vary (GB1 mutates 4 of 56) are constant one-hot columns whose
    first-layer weights would act as extra biases; centred they are exactly zero. Centring keeps
    every input within [-1, 1] for a one-hot: unlike a per-feature standardisation it never
    amplifies a column that is rare in training (dividing by its tiny standard deviation turned a
    substitution seen once in 10,000 rows into an input of ~100 and predictions far out of range).
    """

    def __init__(self, n_features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))

    def set(self, mean: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean


def _feature_stats(train: ChunkSource, n_features: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training mean and variance of every flattened feature (float64, CPU), and the row count."""
    total = torch.zeros(n_features, dtype=torch.float64)
    total_sq = torch.zeros(n_features, dtype=torch.float64)
    n = 0
    for x, _ in train():
        f = x.flatten(1).double().cpu()
        total += f.sum(0)
        total_sq += (f * f).sum(0)
        n += len(f)
    mean = total / max(n, 1)
    return mean, (total_sq / max(n, 1) - mean * mean).clamp_min(0), n


def _sample_rows(train: ChunkSource, n_rows: int, limit: int = SAMPLE_ROWS) -> torch.Tensor:
    """Up to `limit` of the `n_rows` training rows, spread over the chunks (every chunk its share)."""
    step = max(1, math.ceil(n_rows / limit))
    return torch.cat([x[::step].float() for x, _ in train()])[:limit]


def _sparse_input_init(layer: nn.Linear, variance: torch.Tensor) -> None:
    """Initialise `layer` for centred, sparse inputs of per-column `variance` (data-dependent).

    PyTorch's default (uniform ±1/sqrt(fan_in)) assumes every input carries unit variance. A centred
    one-hot of a variant with a few substitutions has a few non-zero entries among thousands (Bgl3:
    E||x||² = 3.8 over 14,028 inputs), so its pre-activations had std 0.0095 and ten Adam steps of
    the learning rate on the biases outweighed every input: the ReLUs were set by the biases alone
    and the network added nothing to the ridge fit. Here the weights are N(0, 1/E||x||²), so a typical
    training row starts at unit pre-activation variance, as the default intends for dense inputs
    (a data-dependent initialisation in the spirit of LSUV, Mishkin & Matas 2016); biases start at
    zero. Columns that never vary in training get zero weights: they are zero in every training
    row, so no gradient ever reaches them, and a substitution never seen in training then moves
    the network by nothing (the ridge part gives it zero too).
    """
    varying = variance > VARYING
    spread = float(variance[varying].sum())
    with torch.no_grad():
        weight = torch.randn_like(layer.weight) / math.sqrt(max(spread, 1e-12))
        layer.weight.copy_(weight * varying.to(weight)[None, :])
        layer.bias.zero_()


class _RidgeBase(ProteinModel):
    """Shared by the non-linear built-ins: an optional exact ridge part plus a learned part.

    With `base: "ridge"` the additive effects are solved in closed form before training and held
    fixed; the network learns what they leave (its last layer starts at zero, so training starts
    from the ridge fit, and that start is a checkpoint candidate like any epoch: a network that never
    helps on validation ends as the fit itself). The additive part therefore cannot win a race
    against the non-linear one and end training early, and a substitution rare in training moves the
    prediction no more than it moves ridge. Classification (n_outputs > 1) never has the ridge part.
    """

    start_name = "ridge fit"

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int, base: str):
        super().__init__(seq_len, in_dim, n_outputs)
        n_features = self.seq_len * self.in_dim
        self.base = RidgeHead(n_features) if _check_base(base, n_outputs) else None
        self.fitted_start = self.base is not None  # without the ridge part the start predicts a constant
        self.centre = FeatureMean(n_features)
        # set once the network's data-dependent initialisation ran; saved with the weights, so a
        # resumed run (which calls fit_closed_form again) keeps its trained network
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def fit_closed_form(self, train: ChunkSource, val: ChunkSource | None) -> None:
        mean, variance, n_rows = _feature_stats(train, self.seq_len * self.in_dim)
        if self.base is not None:
            self.base.fit(train, val)
        self.centre.set(mean)
        if not bool(self.initialised):
            self.init_network(train, variance, n_rows)
            self.initialised.fill_(True)

    def init_network(self, train: ChunkSource, variance: torch.Tensor, n_rows: int) -> None:
        """Data-dependent initialisation of the network, before the first gradient step."""
        raise NotImplementedError

    def _with_base(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = self._out(y)
        return y if self.base is None else y + self.base(x).to(y.dtype)


def _zero_last(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


@register_model("mlp")
class MLPModel(_RidgeBase):
    """Fully connected network on the centred, flattened embedding: interactions between sites.

    `base` ("ridge" default, or "none"): the exact ridge fit the network adds to (see `_RidgeBase`).
    Inputs are centred on their training mean (`FeatureMean`), never scaled.
    """

    def __init__(
        self,
        seq_len: int,
        in_dim: int,
        n_outputs: int = 1,
        hidden: list[int] | int = (512, 256),
        dropout: float = 0.1,
        base: str = "ridge",
    ):
        super().__init__(seq_len, in_dim, n_outputs, base)
        sizes = [hidden] if isinstance(hidden, int) else list(hidden)
        width = self.seq_len * self.in_dim
        layers: list[nn.Module] = []
        for size in sizes:
            layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(size)
        last = nn.Linear(width, n_outputs)
        layers.append(_zero_last(last) if self.base is not None else last)
        self.net = nn.Sequential(*layers)

    def init_network(self, train: ChunkSource, variance: torch.Tensor, n_rows: int) -> None:
        _sparse_input_init(self.net[0], variance.to(self.net[0].weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_base(x, self.net(self.centre(x.flatten(1).float())))


@register_model("cnn")
class CNNModel(_RidgeBase):
    """1-D convolutions over the sequence, then a position-aware dense head.

    Convolutions see each residue in its local context; the head keeps the position (a few
    channels per position, flattened) because the effect of a substitution depends on where it is.
    `base` ("ridge" default, or "none"): the exact additive fit the network adds to (`_RidgeBase`).
    """

    def __init__(
        self,
        seq_len: int,
        in_dim: int,
        n_outputs: int = 1,
        channels: int = 32,
        kernel_size: int = 5,
        n_layers: int = 2,
        head_channels: int = 8,
        hidden: int = 64,
        dropout: float = 0.1,
        base: str = "ridge",
    ):
        if int(seq_len) == 1:  # pooled features (the `plm` embedding): nothing to convolve over
            raise ParamError(
                "model 'cnn' needs per-residue features; use a one-hot/BLOSUM embedding or an embedding "
                "plugin that keeps positions"
            )
        super().__init__(seq_len, in_dim, n_outputs, base)
        convs: list[nn.Module] = []
        width = self.in_dim
        for _ in range(int(n_layers)):
            convs += [nn.Conv1d(width, channels, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            width = channels
        convs += [nn.Conv1d(width, head_channels, 1), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.reach = int(n_layers) * (int(kernel_size) // 2)  # positions a head input sees either side
        last = nn.Linear(hidden, n_outputs)
        self.head = nn.Sequential(
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(head_channels * self.seq_len, hidden),
            nn.ReLU(),
            _zero_last(last) if self.base is not None else last,
        )

    def init_network(self, train: ChunkSource, variance: torch.Tensor, n_rows: int) -> None:
        # Layer by layer on a sample of training rows (LSUV, Mishkin & Matas 2016): each convolution
        # scaled to unit output variance, then the head's first layer as `mlp`'s (`_sparse_input_init`).
        # With PyTorch's defaults the head's pre-activations moved far less with a substitution than
        # Adam moves the biases in a few steps: the network stayed flat at the ridge fit on Bgl3
        # (validation Spearman 0.5647 to the fifth decimal for ten epochs).
        sample = _sample_rows(train, n_rows).to(self.centre.mean)
        with torch.no_grad():
            h = sample.transpose(1, 2)
            for layer in self.convs:
                if isinstance(layer, nn.Conv1d):
                    layer.bias.zero_()
                    layer.weight.div_(max(float(layer(h).std()), 1e-6))
                h = layer(h)
            diff = self._head_input(sample).flatten(1)
        # a head input varies when some position within its reach varies in training; the others are
        # zero in every training row and stay so, as a never-seen position's substitution stays unused
        position_varies = (variance.view(self.seq_len, self.in_dim) > VARYING).any(1).float()
        window = torch.ones(1, 1, 2 * self.reach + 1, dtype=position_varies.dtype)
        near = nn.functional.conv1d(position_varies.view(1, 1, -1), window, padding=self.reach).view(-1) > 0
        head_channels = diff.shape[1] // self.seq_len
        column_variance = diff.var(0) if len(diff) > 1 else torch.zeros(diff.shape[1])
        column_variance = column_variance * near.repeat(head_channels).to(column_variance)
        _sparse_input_init(self.head[2], column_variance.to(self.head[2].weight))

    def _head_input(self, x: torch.Tensor) -> torch.Tensor:
        # The convolutions see the one-hot itself (they share weights across positions), but the head
        # sees their features minus those of the training-mean sequence: at positions that never vary
        # the features are constants, and thousands of constant head inputs act as biases that Adam
        # moves coherently, switching every ReLU off within a few steps (the network then predicted
        # one value for every variant). Centred, they are exactly zero.
        feats = self.convs(x.float().transpose(1, 2))
        reference = self.convs(self.centre.mean.view(1, self.seq_len, self.in_dim).transpose(1, 2))
        return feats - reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._with_base(x, self.head(self._head_input(x)))


@register_model("ge")
class GlobalEpistasisModel(ProteinModel):
    """Global epistasis: an additive latent phenotype through a learned monotone nonlinearity.

    `y = g(z)`, `z = w·x + b` on the flattened embedding, `g(z) = c + s·(a·u + Σ_k v_k tanh(r_k u + t_k))`
    with `u = (z - m)/s` and `a, v_k, r_k > 0` (softplus), so `g` is increasing: saturation,
    thresholds and diminishing returns between substitutions are captured with one parameter per
    substitution (as in MAVE-NN / Otwinowski 2018). The latent starts at the exact ridge fit and
    `g` near the identity (m, s: the mean and spread of the ridge fit on the training rows), so
    training starts where `ridge` ends (an increasing `g` keeps ridge's ranking: the start's
    validation Spearman is ridge's). `units`: tanh units of `g`; `l2`: penalty on the latent's
    move away from the ridge weights (per feature, as `linear`'s).
    """

    fitted_start = True
    start_name = "ridge fit"  # the latent at the ridge fit, g near the identity

    def __init__(self, seq_len: int, in_dim: int, n_outputs: int = 1, units: int = 8, l2: float = 1.0):
        super().__init__(seq_len, in_dim, n_outputs)
        _regression_only("ge", n_outputs)
        n_features = self.seq_len * self.in_dim
        self.base = RidgeHead(n_features)
        self.weight = nn.Parameter(torch.zeros(n_features))  # the latent's move from the ridge weights
        self.l2 = float(l2)
        self.register_buffer("loc", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        inv_softplus_1 = math.log(math.e - 1)
        self.slope = nn.Parameter(torch.tensor(inv_softplus_1))
        self.unit_weight = nn.Parameter(torch.full((int(units),), -6.0))  # softplus(-6) ≈ 0.0025: g starts ≈ identity
        self.unit_gain = nn.Parameter(torch.full((int(units),), inv_softplus_1))
        self.unit_shift = nn.Parameter(torch.linspace(-2.0, 2.0, int(units)))
        self.offset = nn.Parameter(torch.zeros(()))

    def fit_closed_form(self, train: ChunkSource, val: ChunkSource | None) -> None:
        self.base.fit(train, val)
        with torch.no_grad():
            z = torch.cat([self.base(x.to(self.base.weight.device)).double().cpu() for x, _ in train()])
            self.loc.fill_(float(z.mean()))
            self.scale.fill_(max(float(z.std()), 1e-6) if len(z) > 1 else 1.0)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x.flatten(1).float() @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (self.latent(x) - self.loc) / self.scale
        sp = nn.functional.softplus
        units = torch.tanh(sp(self.unit_gain) * u[:, None] + self.unit_shift) * sp(self.unit_weight)
        return self.loc + self.scale * (self.offset + sp(self.slope) * u + units.sum(-1))

    def penalty(self) -> torch.Tensor:
        return self.l2 * self.weight.pow(2).sum() / self.weight.shape[0]


def create_model(name: str, seq_len: int, in_dim: int, n_outputs: int, params: dict | None = None) -> nn.Module:
    """Build the named model; it must be an `nn.Module` (a `ProteinModel` for the built-ins)."""
    MODELS.check_params(name, params or {}, "model.params", fixed=("seq_len", "in_dim", "n_outputs"))
    model = MODELS.get(name)(seq_len=seq_len, in_dim=in_dim, n_outputs=n_outputs, **(params or {}))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} factory returned {type(model).__name__}, not a torch.nn.Module")
    return model
