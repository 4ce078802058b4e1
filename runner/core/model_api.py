"""The Python API of a trained experiment: `load_model(exp_dir).predict(["H24A", "E64K:S70G"])`.

`load_model` wraps what `infra predict` runs (`runner.core.predict.load_predictor`): the model is
rebuilt from its checkpoint, the template, vocabulary and target transform come from
`config/predict.json`, and mutants go through the same parser and checks. Predictions are on the
target's original scale (the training's transform inverted). docs/python-api.md is the user's guide.

`Model.export_torchscript` writes the model as a TorchScript file (traced) that maps a token matrix
(`Model.encode`) to the same predictions with nothing of infra installed, plus a JSON sidecar that
says how to build that matrix. Exportable: every built-in model (ridge, linear, mlp, cnn, ge) on the
built-in per-residue embeddings (onehot, blosum62), with every target transform (rank included:
its inverse is a table lookup the file carries). Not exportable, with an `ExportError` saying why:
the `plm` embedding (it needs the language model and its cache), `data.covariates` experiments
(their covariates are looked up by sequence at run time), and a plugin model whose traced graph
does not reproduce its own predictions (Python control flow on the data).

Errors: a bad directory, checkpoint or input is a `runner.errors.DataError`; a mutant the model
cannot take is a `MutantError`, which is also a `ValueError`; all are `runner.errors.InfraError`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from runner.core.predict import Predictor, load_predictor, mutant_text
from runner.errors import DataError, InfraError, shorten

CHECKPOINTS = ("ckpts/best.ckpt", "ckpts/last.ckpt")  # the default checkpoint: the first that exists
PREDICT_STATE = "config/predict.json"
TARGET_SORTED = "config/target_sorted.npy"
PLAN = "config/plan.json"
CHUNK = 1 << 16  # mutants parsed and scored at a time (as `infra predict`)
EXPORT_FORMAT = 1  # of the TorchScript sidecar
EXPORT_TOLERANCE = 1e-5  # how closely the traced module must reproduce `predict` (relative to the spread)


class MutantError(DataError, ValueError):
    """A mutant the model cannot take (malformed, outside the template, wrong wild type, unknown residue)."""


class ExportError(InfraError):
    """The model cannot be exported: the message names the model and why (exit 2)."""


def load_model(
    exp_dir: str | Path,
    *,
    source: str | None = None,
    workdir: str | Path | None = None,
    checkpoint: str | Path | None = None,
    device: str | None = None,
) -> Model:
    """The trained model of an experiment directory, ready to predict.

    `exp_dir`: an experiment directory, or a copy holding only `config/predict.json`, a checkpoint
    (`ckpts/best.ckpt` or `ckpts/last.ckpt`), `config/target_sorted.npy` for the rank transform and
    optionally `config/plan.json` (the MLflow model's `experiment` folder is such a copy).
    `source`: which template when the training had several. `workdir`: the workdir whose plugins
    the model needs (a plugin model, embedding or vocab); its plugin code is imported and run here.
    `checkpoint`: a path (relative ones against `exp_dir`); default best.ckpt, else last.ckpt.
    `device`: e.g. "cpu" or "cuda:0"; default the first GPU when there is one.
    A `plm` experiment needs the node's model store (`INFRA_MODEL_STORE`) with the same weights.
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        raise DataError(f"{exp_dir}: no such experiment directory; give the folder that holds config/ and ckpts/")
    if not (exp_dir / PREDICT_STATE).is_file():
        raise DataError(
            f"{exp_dir}: no {PREDICT_STATE}; give an experiment directory (or a copy with {PREDICT_STATE}, "
            f"{' or '.join(CHECKPOINTS)} and, for the rank transform, {TARGET_SORTED})"
        )
    if _transform_name(exp_dir / PREDICT_STATE) == "rank" and not (exp_dir / TARGET_SORTED).is_file():
        raise DataError(
            f"{exp_dir}: no {TARGET_SORTED}: the rank transform's inverse needs the training's targets; "
            "copy it with the experiment's other files"
        )
    if checkpoint is None:
        found = next((exp_dir / c for c in CHECKPOINTS if (exp_dir / c).is_file()), None)
        if found is None:
            raise DataError(
                f"{exp_dir}: no checkpoint ({' or '.join(CHECKPOINTS)}); the experiment did not finish "
                "training: run it again ('infra run PLAN --rerun') or pass checkpoint="
            )
        checkpoint = found
    else:
        checkpoint = exp_dir / checkpoint  # an absolute path stays itself
        if not checkpoint.is_file():
            raise DataError(f"checkpoint {checkpoint}: no such file")
    from runner.core.registry import ParamError, RegistryError

    try:
        predictor = load_predictor(exp_dir, checkpoint, Path(workdir) if workdir is not None else None, source)
    except RegistryError as exc:
        if workdir is not None or isinstance(exc, ParamError):
            raise
        raise DataError(
            f"{exp_dir}: {exc.message}; a plugin's model needs its workdir: load_model(..., workdir=DIR)"
        ) from None
    if device is not None:
        predictor.module.to(device)
        predictor.device = torch.device(device)
    return Model(exp_dir, checkpoint, predictor)


class Model:
    """A trained experiment's model: `predict`, `predict_frame`, `encode`, `export_torchscript`."""

    def __init__(self, exp_dir: Path, checkpoint: Path, predictor: Predictor):
        self.exp_dir, self.checkpoint, self.predictor = exp_dir, checkpoint, predictor
        state = json.loads((exp_dir / PREDICT_STATE).read_text(encoding="utf-8"))  # load_predictor checked it
        self.state = state
        self.sources: list[str] = [s["name"] for s in state["sources"]]
        self.plan: dict | None = _read_plan(exp_dir / PLAN)

    @property
    def template(self) -> str:
        """The wild-type sequence mutants are applied to."""
        return self.predictor.template

    @property
    def covariates(self) -> list[str]:
        """The experiment's data.covariates: each prediction needs their values ([] when none)."""
        return list(self.predictor.covariates)

    @property
    def task(self) -> str:
        """The training's task: "regression" (predictions on the target's scale) or "classification"."""
        return self.predictor.task

    @property
    def transform(self) -> str:
        """The training's target transform (none, log, standardize, rank); predictions are inverted."""
        return self.predictor.transform.name

    @property
    def model_name(self) -> str:
        return str(self.predictor.module.hparams.model_name)

    @property
    def embedding_name(self) -> str:
        return str(self.predictor.module.hparams.embedding_name)

    def __repr__(self) -> str:
        return (
            f"Model({str(self.exp_dir)!r}, model={self.model_name!r}, embedding={self.embedding_name!r}, "
            f"task={self.task!r}, transform={self.transform!r}, template={len(self.template)} residues, "
            f"checkpoint={self.checkpoint.name!r}"
            + (f", covariates={self.covariates!r}" if self.covariates else "")
            + ")"
        )

    # -- prediction

    def predict(self, mutants: Sequence[str], covariates=None, *, errors: str = "raise") -> np.ndarray:
        """One prediction per mutant (float64, the target's original scale; P(class 1) for a classifier).

        `mutants`: strings like "H24A" or "E64K:S70G" ("" is the wild type). A mutant the model cannot
        take raises `MutantError` naming the first one and why; with `errors="nan"` its prediction
        is NaN instead (`predict_frame` says why). `covariates`: with data.covariates, each mutant's
        values: an array N × K in `Model.covariates` order, or a DataFrame with those columns.
        """
        if errors not in ("raise", "nan"):
            raise ValueError(f"errors={errors!r}: use 'raise' or 'nan'")
        prediction, why = self._run(mutants, covariates)
        if errors == "raise" and why is not None:
            bad = np.flatnonzero(why.is_valid().to_numpy(zero_copy_only=False))
            if bad.size:
                first = int(bad[0])
                more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
                raise MutantError(
                    f"mutant {first} {shorten(str(mutants[first]))}: {why[first].as_py()}{more}; "
                    "fix or drop it, or predict(..., errors='nan') for NaN in its place"
                )
        return prediction

    def predict_frame(self, mutants: Sequence[str], covariates=None):
        """A pandas DataFrame with `mutant`, `prediction` (NaN where it cannot be made) and `error`."""
        import pandas as pd

        prediction, why = self._run(mutants, covariates)
        error = why.to_pylist() if why is not None else [None] * len(prediction)
        return pd.DataFrame({"mutant": [str(m) for m in mutants], "prediction": prediction, "error": error})

    def encode(self, mutants: Sequence[str]) -> np.ndarray:
        """The uint8 token matrix N × seq_len of `mutants`: what the TorchScript export takes."""
        if self.covariates:
            raise ExportError(_covariates_refusal(self))
        strings = _strings(mutants)
        parts = []
        for start in range(0, len(strings), CHUNK):
            chunk = pa.array(strings[start : start + CHUNK], pa.large_string())
            scored = self.predictor.score(mutant_text(chunk))
            bad = np.flatnonzero(scored.reason != 0)
            if bad.size:
                why = self.predictor.errors(scored)[int(bad[0])].as_py()
                raise MutantError(f"mutant {start + int(bad[0])} {shorten(strings[start + int(bad[0])])}: {why}")
            parts.append(scored.tokens)
        return np.concatenate(parts) if parts else np.zeros((0, self.predictor.seq_len), np.uint8)

    def _run(self, mutants: Sequence[str], covariates) -> tuple[np.ndarray, pa.Array | None]:
        """Predictions (NaN where a row has an error) and the rows' error texts (None when no row has one)."""
        strings = _strings(mutants)
        values = self._covariate_matrix(covariates, len(strings))
        prediction = np.full(len(strings), np.nan)
        errors: list[pa.Array] = []
        for start in range(0, len(strings), CHUNK):
            chunk = pa.array(strings[start : start + CHUNK], pa.large_string())
            rows = values[start : start + CHUNK] if values is not None else None
            scored = self.predictor.score(mutant_text(chunk), rows)
            prediction[start : start + len(chunk)] = scored.prediction
            errors.append(self.predictor.errors(scored))  # null where the row was predicted
        if not any(e.null_count < len(e) for e in errors):
            return prediction, None
        return prediction, pa.concat_arrays([e.cast(pa.string()) for e in errors])

    def _covariate_matrix(self, covariates, n: int) -> np.ndarray | None:
        names = self.covariates
        if not names:
            if covariates is not None:
                raise DataError(f"{self.exp_dir}: the experiment was trained without data.covariates; drop covariates=")
            return None
        if covariates is None:
            raise DataError(
                f"{self.exp_dir}: the experiment was trained with data.covariates ({', '.join(names)}): "
                "give each mutant's values, predict(mutants, covariates=frame_with_those_columns)"
            )
        if hasattr(covariates, "columns"):  # a DataFrame: its columns by name, in the training's order
            absent = [c for c in names if c not in covariates.columns]
            if absent:
                raise DataError(f"covariates: no column {', '.join(map(repr, absent))} (needed: {', '.join(names)})")
            covariates = covariates[names].to_numpy()
        try:
            values = np.asarray(covariates, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"covariates: not numbers ({exc}); give an array N × {len(names)} ({', '.join(names)})"
            ) from None
        if values.ndim == 1 and len(names) == 1:
            values = values[:, None]
        if values.shape != (n, len(names)):
            raise DataError(
                f"covariates: shape {values.shape}, expected ({n}, {len(names)}): one row per mutant, "
                f"columns {', '.join(names)}"
            )
        missing = ~np.isfinite(values)
        if missing.any():
            row, col = (int(i) for i in np.argwhere(missing)[0])
            raise DataError(
                f"covariates: {names[col]!r} is missing (NaN or infinite) for mutant {row} and "
                f"{int(missing.any(axis=1).sum()) - 1} other row(s); every mutant needs its covariates"
            )
        return values

    # -- export

    def export_torchscript(self, path: str | Path) -> Path:
        """Write the model as TorchScript to `path` and a sidecar `<path>.json`; returns `path`.

        The file's module maps tokens (`Model.encode(mutants)`, uint8 or int64, N × seq_len) to float64
        predictions on the original scale, exactly as `predict` (checked here before anything is
        written). Load it with `torch.jit.load(path)`; infra is not needed. The sidecar holds the
        template, vocabulary (name, params, alphabet), seq_len, task and transform.
        """
        path = Path(path)
        _check_exportable(self)
        wrapper = _Exported(
            copy.deepcopy(self.predictor.module).cpu().eval(), self.task, self.predictor.transform, self._sorted()
        )
        for parameter in wrapper.parameters():  # a frozen copy: the file's outputs need no autograd
            parameter.requires_grad_(False)
        probe = self._probe_tokens()
        try:
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.trace(wrapper, probe[: max(2, len(probe) // 2)], check_trace=False, strict=False)
                got = traced(probe).numpy()
            want = self.predictor.score_tokens(probe.numpy())  # the reference: what `predict` computes
        except Exception as exc:  # tracing runs the model's own (maybe plugin) code: any failure is "cannot export"
            raise ExportError(
                f"model {self.model_name!r} (embedding {self.embedding_name!r}) cannot be traced to TorchScript: "
                f"{type(exc).__name__}: {shorten(str(exc), 200, quote=False)}"
            ) from None
        scale = max(1.0, float(np.nanmax(np.abs(want))) if len(want) else 1.0)
        if got.shape != want.shape or not np.allclose(got, want, rtol=0, atol=EXPORT_TOLERANCE * scale, equal_nan=True):
            raise ExportError(
                f"model {self.model_name!r}: its traced TorchScript gives other predictions than the model "
                "(Python control flow on the data, which tracing freezes); it cannot be exported"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        traced.save(str(tmp))
        tmp.replace(path)
        sidecar = path.with_name(path.name + ".json")
        sidecar.write_text(json.dumps(self._sidecar(), indent=2) + "\n", encoding="utf-8")
        return path

    def _sorted(self) -> np.ndarray | None:
        if self.transform != "rank":
            return None
        return np.load(self.exp_dir / TARGET_SORTED, allow_pickle=False).astype(np.float64)

    def _probe_tokens(self) -> torch.Tensor:
        """Tokens to trace and check on: the wild type and single substitutions spread over the template."""
        vocab = self.predictor.vocab
        residues = [a for a in "ACDEFGHIKLMNPQRSTVWY" if vocab.lookup[ord(a)] != 255]
        step = max(1, len(self.template) // 24)
        probes = [""] + [
            f"{wt}{pos}{residues[(pos + k) % len(residues)]}"
            for k, pos in enumerate(range(1, len(self.template) + 1, step))
            for wt in [self.template[pos - 1]]
            if residues and residues[(pos + k) % len(residues)] != wt.upper()
        ]
        scored = self.predictor.score(mutant_text(pa.array(probes, pa.large_string())))
        tokens = scored.tokens
        if len(tokens) < 4:  # a template too short (or a vocab too odd) for substitutions: repeat the wild type
            tokens = np.repeat(tokens[:1], 4, axis=0)
        return torch.from_numpy(np.ascontiguousarray(tokens))

    def _sidecar(self) -> dict:
        vocab = self.predictor.vocab
        return {
            "format": EXPORT_FORMAT,
            "input": "uint8 or int64 tokens, N x seq_len: the template with the mutations applied, one id per "
            "residue (id = 1 + index in vocab.alphabet), right-padded with pad_id; Model.encode builds it",
            "output": "float64 predictions, one per row, on the target's original scale"
            if self.task == "regression"
            else "float64 scores, one per row: P(class 1) (or the argmax class for more than two)",
            "model": self.model_name,
            "embedding": self.embedding_name,
            "task": self.task,
            "sources": self.sources,
            "template": self.template,
            "seq_len": int(self.predictor.seq_len),
            "vocab": {
                **self.state["vocab"],
                "alphabet": "".join(vocab.alphabet),
                "pad_id": int(vocab.pad_id),
            },
            "transform": {k: v for k, v in self.state["transform"].items() if k != "sorted_file"},
        }


class _Exported(nn.Module):
    """tokens → embedding → model → score → the transform's inverse, in float64: what `Predictor`
    computes (`export_torchscript` checks that it does, on real mutants, before writing)."""

    def __init__(self, module: nn.Module, task: str, transform, sorted_targets: np.ndarray | None):
        super().__init__()
        # the LightningModule's parts, not the LightningModule: tracing reads attributes such as
        # `trainer`, which raise outside a Trainer
        self.embed, self.model = module.embed, module.model
        self.classification = task == "classification"
        self.kind = "none" if self.classification else transform.name
        params = transform.params
        self.register_buffer("mean", torch.tensor(float(params.get("mean", 0.0)), dtype=torch.float64))
        self.register_buffer("std", torch.tensor(float(params.get("std", 1.0)), dtype=torch.float64))
        self.register_buffer("shift", torch.tensor(float(params.get("shift", 0.0)), dtype=torch.float64))
        values = sorted_targets if sorted_targets is not None else np.zeros(1)
        n = self.n_values = len(values)
        self.register_buffer("grid", (torch.arange(n, dtype=torch.float64) + 0.5) / n)
        self.register_buffer("values", torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.model(self.embed(tokens.to(torch.uint8))).float()
        if self.classification:  # as VariantModule.scores: P(class 1), or the argmax class
            out = out.softmax(-1)[:, 1] if out.shape[-1] == 2 else out.argmax(-1).float()
        z = out.double()  # float32 scores, inverted in float64: as Predictor.score_tokens
        if self.kind == "log":
            return torch.exp(z) - self.shift
        if self.kind == "standardize":
            return z * self.std + self.mean
        if self.kind == "rank":
            return _interp(z, self.grid, self.values, self.n_values)
        return z


def _interp(z: torch.Tensor, grid: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """`numpy.interp(z, grid, values)` for an increasing `grid` of `n` points: linear inside, the end
    values outside."""
    if n == 1:
        return values[0].expand_as(z).clone()
    idx = torch.searchsorted(grid, z.contiguous(), right=True).clamp(1, n - 1)
    x0, x1, y0, y1 = grid[idx - 1], grid[idx], values[idx - 1], values[idx]
    y = y0 + (z - x0) / (x1 - x0) * (y1 - y0)
    y = torch.where(z <= grid[0], values[0], y)
    return torch.where(z >= grid[n - 1], values[n - 1], y)


def _check_exportable(model: Model) -> None:
    from runner.core.plm import PLMEmbedding

    if model.covariates:
        raise ExportError(_covariates_refusal(model))
    if any(isinstance(m, PLMEmbedding) for m in model.predictor.module.modules()):
        raise ExportError(
            f"model {model.model_name!r} on embedding 'plm' cannot be exported: its features come from the "
            "protein language model in the node's model store (and its cache), which the file cannot hold; "
            "use load_model(...).predict on a node with the model store"
        )


def _covariates_refusal(model: Model) -> str:
    return (
        f"model {model.model_name!r} with data.covariates ({', '.join(model.covariates)}) cannot be exported: "
        "the covariates are looked up per sequence at run time; use load_model(...).predict(mutants, covariates=...)"
    )


def _strings(mutants: Sequence[str]) -> list[str]:
    if isinstance(mutants, str):
        raise TypeError("predict takes a list of mutants, e.g. ['H24A', 'E64K:S70G'], not one string")
    out = []
    for i, m in enumerate(mutants):
        if not isinstance(m, str):
            if m is None or (isinstance(m, float) and math.isnan(m)):
                raise MutantError(f"mutant {i} is missing (None/NaN); give '' for the wild type")
            raise MutantError(f"mutant {i} {shorten(m)}: not a string")
        out.append(m)
    return out


def _transform_name(path: Path) -> str | None:
    """The transform `config/predict.json` names (None when the file is not the expected shape:
    `load_predictor` then says what is wrong with it)."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return str(state["transform"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_plan(path: Path) -> dict | None:
    """`config/plan.json` as a dict, or None when the copy has none (or it is not a JSON object)."""
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc})") from None
    return plan if isinstance(plan, dict) else None
