"""The typed view of a plan (DESIGN §3): pydantic models that `schemas/plan.schema.json` is generated from.

Every model forbids unknown keys. Defaults here are the documented defaults; `runner.plan.load` loads,
expands dotted keys, applies overrides and runs the semantic checks a schema cannot express.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# `name` may hold {plan.key} placeholders, filled from the plan itself when it is loaded
# (runner.plan.load.resolve_name): "blat-{model.name}-s{train.seed}" → "blat-cnn-s1"
PLACEHOLDER = r"\{[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\}"
NAME_TEMPLATE_PATTERN = rf"^(?:[a-z0-9._-]|{PLACEHOLDER}){{1,64}}$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
REGISTRY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
GPU_LIST_PATTERN = r"^(all|none|[0-9]+(,[0-9]+)*)$"
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?[bkmgBKMG]?$"

WHERE_OPS = ("=", "!=", "<", "<=", ">", ">=", "in", "not_in", "like", "between", "is_null", "not_null")
SPLIT_STRATEGIES = ("random", "mut_num", "modulo", "contiguous", "column")
DEFAULT_METRICS = ["spearman", "pearson", "mse", "rmse", "mae", "ndcg"]


SEED_MAX = 2**32 - 1  # numpy and Lightning's seed_everything take 0..2**32-1
SQLITE_INT_MAX = 2**63 - 1  # a bound SQLite parameter is a signed 64-bit integer
SQLITE_INT_MIN = -(2**63)
MAX_DEVICES = 1024
MAX_COVARIATES = 64  # data.covariates: features beside the embedding, not a second feature table
SELECT_BY_PATTERN = r"^val_[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # val_ + a registered metric name, or val_loss


def _integral_float(value: Any) -> Any:
    # JSON has one number type: 256.0 is the integer 256 to a JSON Schema validator, so it is here.
    # Any other non-int (a string, a boolean, 2.5) is left for the strict int check to refuse.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# On every integer key, after its bounds (so they stay JSON Schema keywords): strict (no "3", no
# true), but 3.0 is 3, as in the JSON Schema.
INTEGRAL = BeforeValidator(_integral_float)


class Strict(BaseModel):
    """Base of every plan model: unknown keys refused; types strict, exactly as the JSON Schema says
    ("0.1" is not a number, true is not an integer, "yes" is not a boolean); numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class WhereClause(Strict):
    """One filter on the `mutations` (or `sources`) columns; the value is always bound as a parameter."""

    # The value's shape is checked here, once, for the host and the core alike (where_value_problem);
    # what needs the database (does the column exist) is checked against it by runner.plan.load and
    # runner.core.data.
    model_config = ConfigDict(json_schema_extra=lambda schema: schema.update(allOf=_where_value_schemas()))

    column: Annotated[str, Field(pattern=IDENTIFIER_PATTERN, description="column of the mutations table")]
    op: Literal[WHERE_OPS] = Field(description="comparison operator")  # type: ignore[valid-type]
    value: Any = Field(
        default=None,
        validate_default=True,  # a missing value is a wrong shape for most ops
        description="scalar; a list for in/not_in; [low, high] for between; absent for is_null/not_null",
    )

    @field_validator("value")
    @classmethod
    def _value_fits_op(cls, value: Any, info: ValidationInfo) -> Any:
        op = info.data.get("op")
        problem = where_value_problem(op, value) if op is not None else None  # a bad op is reported on .op
        if problem:
            # reported as data.where[i].value: <problem> (runner.plan.issues keeps the message as is)
            raise PydanticCustomError("where_value", problem)
        return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool)


def _where_value_schemas() -> list[dict]:
    """The value shapes of `where_value_problem` as JSON Schema, so the published schema states them too
    (finiteness and SQLite's integer range stay with the models: JSON Schema cannot say them here)."""
    scalar = {"type": ["string", "number", "boolean"]}

    def when(ops: list[str], value: dict) -> dict:
        rule = {"properties": {"value": value}}
        if value != {"type": "null"}:
            rule["required"] = ["value"]
        return {"if": {"properties": {"op": {"enum": ops}}, "required": ["op"]}, "then": rule}

    listed = ("in", "not_in", "between", "like", "is_null", "not_null")
    return [
        when(["is_null", "not_null"], {"type": "null"}),
        when(["in", "not_in"], {"type": "array", "minItems": 1, "items": scalar}),
        when(["between"], {"type": "array", "minItems": 2, "maxItems": 2, "items": scalar}),
        when(["like"], {"type": "string"}),
        when([op for op in WHERE_OPS if op not in listed], scalar),
    ]


def where_value_problem(op: str, value: Any) -> str | None:
    """What is wrong with `value` for where-op `op` (a message for `data.where[i].value`), or None."""
    if op in ("is_null", "not_null"):
        return None if value is None else f"must be absent for op '{op}'"
    if op in ("in", "not_in"):
        fits = isinstance(value, list | tuple) and len(value) > 0 and all(map(_is_scalar, value))
        shape = f"must be a non-empty list of scalars for op '{op}'"
    elif op == "between":
        fits = isinstance(value, list | tuple) and len(value) == 2 and all(map(_is_scalar, value))
        shape = "must be [low, high] for op 'between'"
    elif op == "like":
        fits, shape = isinstance(value, str), "must be a string pattern for op 'like'"
    else:
        fits, shape = _is_scalar(value), f"must be a string, number or boolean for op '{op}'"
    if not fits:
        return shape
    values = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        return "numbers must be finite"
    if any(
        isinstance(v, int) and not isinstance(v, bool) and not SQLITE_INT_MIN <= v <= SQLITE_INT_MAX for v in values
    ):
        return "integers must lie within ±9223372036854775807 (SQLite's range)"
    return None


class DataSpec(Strict):
    # data.limit and data.sample exclude each other (_sample_or_limit); the schema says so too
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "required": ["limit", "sample"],
                "properties": {"limit": {"type": "integer"}, "sample": {"type": "integer"}},
            }
        }
    )

    db: Annotated[
        str,
        Field(min_length=1, description="SQLite database on the host; relative to the plan's folder, then the workdir"),
    ]
    dataset: str | list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="one sources.source_text value or a list of them; all when absent"
    )
    where: list[WhereClause] = Field(default_factory=list, description="filters, combined with AND")
    target: Literal["DMS_score", "DMS_score_bin"] = Field(
        default="DMS_score", description="DMS_score: regression; DMS_score_bin: classification"
    )
    transform: Literal["none", "log", "standardize", "rank"] = Field(
        default="none", description="target transform for training; metrics stay on the original scale"
    )
    on_mismatch: Literal["error", "drop"] = Field(
        default="error",
        description="rows whose mutant does not match the template: fail naming the row, or drop them and report the count",
    )
    drop_nan: bool = Field(default=True, description="drop rows whose target is NaN/NULL (their count is reported)")
    limit: Annotated[int, Field(gt=0, le=SQLITE_INT_MAX), INTEGRAL] | None = Field(
        default=None, description="read at most this many rows (in id order: the first ids only; see data.sample)"
    )
    sample: Annotated[int, Field(gt=0, le=SQLITE_INT_MAX), INTEGRAL] | None = Field(
        default=None,
        description="a seeded random subsample of this many rows of the selection, before the split "
        "(the way to keep a run small); not with data.limit",
    )
    sample_seed: Annotated[int, Field(ge=0, le=SEED_MAX), INTEGRAL] = Field(
        default=0, description="seed of data.sample (independent of split.seed and train.seed)"
    )
    covariates: Annotated[list[Annotated[str, Field(pattern=IDENTIFIER_PATTERN)]], Field(max_length=MAX_COVARIATES)] = (
        Field(
            default_factory=list,
            json_schema_extra={"uniqueItems": True},
            description="extra numeric mutations columns (e.g. a zero-shot score imported with --extra-columns) "
            "given to the model beside the embedding, standardised on the training rows; a missing value is refused",
        )
    )

    @field_validator("sample")
    @classmethod
    def _sample_or_limit(cls, sample: int | None, info: ValidationInfo) -> int | None:
        # two ways of cutting the selection down: which applies first would change what either means
        if sample is not None and info.data.get("limit") is not None:
            raise PydanticCustomError(
                "sample_with_limit",
                "give data.sample or data.limit, not both: sample draws rows at random from the whole "
                "selection, limit takes the first ids",
            )
        return sample

    @field_validator("covariates")
    @classmethod
    def _covariates_unique(cls, covariates: list[str]) -> list[str]:
        # a column twice would be one feature counted twice (and two equal standardised columns)
        for i, column in enumerate(covariates):
            if column in covariates[:i]:
                raise PydanticCustomError(
                    "duplicate_covariate",
                    "'{column}' is listed twice (items {first} and {i}); list each column once",
                    {"column": column, "first": covariates.index(column), "i": i},
                )
        return covariates


class NamedComponent(Strict):
    name: Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN, description="registered name (built-in or plugin)")]
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for the component's factory")


class VocabSpec(NamedComponent):
    name: Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN)] = Field(
        default="IUPAC", description="registered vocabulary"
    )


class EmbeddingSpec(NamedComponent):
    name: Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN)] = Field(
        default="onehot", description="registered embedding, applied per batch on the training device"
    )


class ModelSpec(NamedComponent):
    pass


class SplitSpec(Strict):
    strategy: Literal[SPLIT_STRATEGIES] = Field(  # type: ignore[valid-type]
        default="random",
        description="random; mut_num (train on fewer mutations, test on more); modulo / contiguous (ProteinGym position folds); column",
    )
    n_folds: Annotated[int, Field(ge=2, le=100), INTEGRAL] | None = Field(
        default=None, description="k-fold: the test set is fold `fold` of n_folds"
    )
    fold: Annotated[int, Field(ge=0, le=99), INTEGRAL] | Literal["all"] = Field(
        default=0,
        description='which fold is the test set (0-based; needs n_folds); "all": one experiment per fold (a study)',
    )
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.2, description="share of rows in the test set (no n_folds)"
    )
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = Field(
        default=0.1, description="share of all selected rows used for validation (taken from the non-test rows)"
    )
    seed: Annotated[int, Field(ge=0, le=SEED_MAX), INTEGRAL] = Field(
        default=0, description="seed of the split's shuffling"
    )
    column: Annotated[str, Field(pattern=IDENTIFIER_PATTERN)] | None = Field(
        default=None, description="strategy=column: a mutations column holding train/val/test (or fold numbers)"
    )
    max_train_mut_num: Annotated[int, Field(ge=0, le=1_000_000), INTEGRAL] = Field(
        default=1,
        description="strategy=mut_num: train/val on variants with at most this many mutations, test on the rest",
    )


class TrainSpec(Strict):
    lr: Annotated[float, Field(gt=0, le=10)] = Field(default=1e-3, description="learning rate")
    batch_size: Annotated[int, Field(gt=0, le=1_048_576), INTEGRAL] = Field(
        default=256, description="variants per step"
    )
    max_epochs: Annotated[int, Field(gt=0, le=100_000), INTEGRAL] = Field(
        default=30, description="upper bound on epochs"
    )
    seed: Annotated[int, Field(ge=0, le=SEED_MAX), INTEGRAL] = Field(
        default=0, description="seed of weights, shuffling and dropout (Lightning seed_everything)"
    )
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed", "64"] = Field(
        default="auto", description="auto: bf16-mixed on a GPU that supports it, else 32"
    )
    weight_decay: Annotated[float, Field(ge=0)] = Field(default=0.0, description="optimizer weight decay (L2)")
    early_stopping_patience: Annotated[int, Field(ge=0, le=100_000), INTEGRAL] = Field(
        default=5, description="epochs without val improvement; 0 disables early stopping"
    )
    devices: Annotated[int, Field(ge=1, le=MAX_DEVICES), INTEGRAL] | Literal["auto"] = Field(
        default="auto", description="Lightning devices"
    )
    accelerator: Literal["auto", "cpu", "gpu"] = Field(default="auto", description="auto: the GPU when one is visible")
    optimizer: Literal["adam", "adamw", "sgd"] = Field(default="adamw", description="optimizer")
    gradient_clip_val: Annotated[float, Field(ge=0)] | None = Field(
        default=None, description="clip gradients to this norm"
    )
    deterministic: bool = Field(default=False, description="torch deterministic algorithms (slower)")
    select_by: Annotated[str, Field(pattern=SELECT_BY_PATTERN)] = Field(
        default="val_spearman",
        description="the validation metric that picks the kept model (ckpts/best.ckpt): val_spearman, val_loss "
        "or val_<metric> of the plan's metrics",
    )


class ResourcesSpec(Strict):
    gpus: Annotated[str, Field(pattern=GPU_LIST_PATTERN)] | Annotated[int, Field(ge=0, le=MAX_DEVICES), INTEGRAL] = (
        Field(default="none", description='"all", a count, a device list "0,2", or "none"; --gpus overrides it')
    )
    shm_size: Annotated[str, Field(pattern=SIZE_PATTERN)] = Field(default="1g", description="container /dev/shm size")
    memory: Annotated[str, Field(pattern=SIZE_PATTERN)] | None = Field(
        default=None, description="container memory limit, e.g. 16g"
    )
    cpus: Annotated[float, Field(ge=0.01, le=4096)] | None = Field(
        default=None, description="container CPU limit (Docker takes 0.01 and up)"
    )
    network: Literal["none", "bridge", "host"] = Field(
        default="none", description="container network; none keeps training offline"
    )


# http(s) only, no user:password@ (credentials come from the host's MLFLOW_TRACKING_* variables,
# never from a plan that travels through queues and experiment folders), no query or fragment
MLFLOW_URI_PATTERN = r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~\-/%]*)?$"


class TrackingSpec(Strict):
    """Where the host logs each finished attempt (params, per-epoch metrics, test metrics, plots)."""

    mlflow_uri: Annotated[str, Field(pattern=MLFLOW_URI_PATTERN, max_length=2048)] = Field(
        description="MLflow tracking server, http(s)://host[:port][/path]; the node must list it "
        "(infra config set tracking_hosts); credentials from the host's MLFLOW_TRACKING_USERNAME/PASSWORD or "
        "MLFLOW_TRACKING_TOKEN, never in the plan"
    )
    experiment: Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")] | None = Field(
        default=None, description="MLflow experiment name; default: the plan's name"
    )


class Plan(Strict):
    """One experiment: what data, which components, how to split and train, what to report."""

    name: Annotated[
        str,
        Field(
            pattern=NAME_TEMPLATE_PATTERN,
            description="experiment name; {plan.key} placeholders are filled from the plan, "
            'e.g. "blat-{model.name}-s{train.seed}-f{split.fold}"',
        ),
    ]
    experiment_id: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        default=None, description="explicit id; default <name>-<10 hex of sha256(plan + plugin image hash)>"
    )
    data: DataSpec
    vocab: VocabSpec = Field(default_factory=VocabSpec)
    embeddings: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    model: ModelSpec
    split: SplitSpec = Field(default_factory=SplitSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    metrics: Annotated[list[Annotated[str, Field(pattern=REGISTRY_NAME_PATTERN)]], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_METRICS),
        validate_default=True,  # train.select_by is checked against the default list too
        description="registered metrics reported on val and test",
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec | None = Field(
        default=None, description="log finished attempts to MLflow from the host; not part of the experiment id"
    )

    @field_validator("metrics")
    @classmethod
    def _select_by_is_measured(cls, metrics: list[str], info: ValidationInfo) -> list[str]:
        # the kept model is picked by a metric the validation pass computes: the plan's metrics
        train = info.data.get("train")
        select_by = train.select_by if isinstance(train, TrainSpec) else None
        if select_by and select_by not in ("val_loss", "val_spearman") and select_by[4:] not in metrics:
            message = (
                f"train.select_by is {select_by!r}: add {select_by[4:]!r} to metrics, "
                "or select by val_spearman or val_loss"
            )
            raise PydanticCustomError("select_by_not_measured", message.replace("{", "{{").replace("}", "}}"))
        return metrics


class GpuRequest(BaseModel):
    """A GPU request parsed once (`--gpus`, `resources.gpus`, a worker's or a study slot's devices) and
    passed on typed: never turned back into text to be parsed again.

    `kind` is "none", "all", "count" (`count` GPUs, any of them) or "devices" (exactly `devices`).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["none", "all", "count", "devices"] = "none"
    count: int = 0
    devices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any, what: str = "--gpus", devices_only: bool = False) -> GpuRequest:
        """`"all"`, `"none"`, a count (`2`, `"2"`) or a device list (`"0,2"`); with `devices_only`, a
        bare number is a device id (a worker's slot `--gpus 1`), never a count. UsageError otherwise."""
        import re

        from runner.errors import UsageError

        if isinstance(value, GpuRequest):
            return value
        if value is None:
            return cls()
        hint = (
            "use device ids like 0,1, all or none"
            if devices_only
            else "use all, none, a GPU count or a device list like 0,2"
        )
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageError(f"{what} {value!r}: {hint}")
        text = str(value).strip().lower()
        if not re.fullmatch(GPU_LIST_PATTERN, text) or (isinstance(value, int) and value > MAX_DEVICES):
            raise UsageError(f"{what} {str(value)[:40]!r}: {hint}")
        if text in ("none", "all"):
            return cls(kind=text)
        numbers = [int(part) for part in text.split(",")]
        if len(set(numbers)) != len(numbers):
            raise UsageError(f"{what} {text!r}: a device is listed twice; {hint}")
        if len(numbers) == 1 and not devices_only and "," not in text:
            return cls(kind="count", count=numbers[0]) if numbers[0] else cls()
        return cls(kind="devices", devices=tuple(numbers))

    @property
    def requested(self) -> bool:
        return self.kind != "none"

    def text(self) -> str:
        """As a user writes it: none, all, 2 (a count), 0,2 (devices)."""
        if self.kind == "count":
            return str(self.count)
        if self.kind == "devices":
            return ",".join(map(str, self.devices))
        return self.kind

    def engine_value(self) -> str | int | None:
        """What `runner.engine.device_requests` takes: None, "all", a count, or "0,2"."""
        return {"none": None, "all": "all", "count": self.count, "devices": self.text()}[self.kind]

    def cuda_visible_devices(self) -> str | None:
        """CUDA_VISIBLE_DEVICES for a host process: "" hides every GPU, a list picks devices, None leaves it."""
        if self.kind == "none":
            return ""
        if self.kind == "devices":
            return self.text()
        return None

    def split(self, slots: int) -> list[GpuRequest]:
        """One request per slot: each listed device its own slot (a study runs one point per GPU)."""
        if self.kind == "devices":
            return [GpuRequest(kind="devices", devices=(d,)) for d in self.devices][:slots] or [self]
        return [self] * slots
