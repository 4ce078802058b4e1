"""What the delivered model is: metrics.json's `kept`, built from the selection rule's outcome.

    {"model": "start" | "epoch" | "closed_form", "epoch": 0-based or null, "by": "val_spearman",
     "value": the kept model's value of `by` or null,
     "best_trained": {"epoch", "value", "start_z"} | null, "why": "<one line>", "warning": "<one line>" | null}

`model` is "start" when no trained epoch was clearly better than a fitted start (runner.core.selection),
"closed_form" for a model solved in one pass (`ridge`), else "epoch". `epoch` is null for the start and
for a closed-form fit. `best_trained` is the trained epoch with the best `by`, whether kept or not; its
`start_z` is the paired z against the start (Spearman selection only). Text (`why`, `warning`, the
summary line) counts epochs from 1, as the epoch lines of the logs do; the fields count from 0, as
metrics.jsonl does.

Why a `warning`: selection looks at one metric. When the kept model is far worse than a trained epoch
on another validation metric, the user should hear it (an avGFP-like set: `mlp` kept its ridge start at
the same validation Spearman while its trained epochs had a quarter of the start's validation loss;
the delivered model's test MSE was 0.359). "Far" is FAR_RATIO for errors and FAR_GAP for scores.
"""

from __future__ import annotations

import math
from typing import Any

from runner.core.metrics import greater_is_better, record_value
from runner.core.selection import LEAVE_START_GAIN, LEAVE_START_REL_GAIN, LEAVE_START_Z

# An error metric (val_loss, mse; lower is better) is far worse at twice a trained epoch's value: the
# sampling error of a mean squared error over n validation rows is about sqrt(2/n) of it (Gaussian
# residuals), 14% at 100 rows, so a factor of 2 is many standard errors on any validation set worth
# selecting on, and the same factor on the squared scale for rmse and mae (square root of it).
FAR_RATIO = 2.0
# A score (a correlation, NDCG, AUC, MCC; higher is better) is far worse 0.1 below: about twice the
# standard error of a correlation near 0.7 on 100 rows ((1 - r^2)/sqrt(n)), and the size of the gap
# between a one-hot baseline and the best published models on ProteinGym's random folds.
FAR_GAP = 0.1
ROOT_SCALE = {"rmse", "mae"}  # errors on the target's own scale: compared at sqrt(FAR_RATIO)


def describe(
    rule,
    history: list[dict],
    selected: str,
    kept_epoch: int | None,
    *,
    closed_form: bool,
    model_name: str,
    start_name: str,
) -> dict[str, Any]:
    """metrics.json's `kept` for a finished run.

    `rule` is the run's SelectionRule (`by`, `greater`, `start`), `history` every trained epoch's record
    (metrics.jsonl, earlier attempts included), `selected`/`kept_epoch` what best.ckpt held.
    """
    by, greater = rule.by, rule.greater
    best = _best_trained(history, by, greater, rule.by_spearman) if not closed_form else None
    records = {r["epoch"]: r for r in history}
    if closed_form:
        model, epoch, record = "closed_form", None, records.get(kept_epoch) if kept_epoch is not None else None
        record = record or (history[-1] if history else None)
        why = f"{model_name} is solved in closed form: its one pass is the model"
    elif selected == "start":
        model, epoch, record = "start", None, rule.start
        why = _why_start(rule, best, start_name)
    else:
        model, epoch = "epoch", kept_epoch
        record = records.get(kept_epoch) if kept_epoch is not None else None
        why = _why_epoch(rule, record, epoch, len(history), start_name)
    others = [r for r in history if model != "epoch" or r["epoch"] != epoch]
    return {
        "model": model,
        "epoch": epoch,
        "by": by,
        "value": record_value(record, by),
        "best_trained": best,
        "why": why,
        "warning": None if closed_form else far_worse(record, others, by, _name(model, epoch)),
    }


def best_trained_epoch(history: list[dict], rule) -> int | None:
    """The trained epoch `rule` ranks first by its own metric (`rule.by`): for a run without best.ckpt."""
    best = _best_trained(history, rule.by, rule.greater, rule.by_spearman)
    return None if best is None else best["epoch"]


def _best_trained(history: list[dict], by: str, greater: bool, by_spearman: bool) -> dict | None:
    valued = [(record_value(r, by), r) for r in history]
    valued = [(v, r) for v, r in valued if v is not None]
    if not valued:
        return None
    # the first of equal values, as the rule keeps the first of equal scores
    value, record = min(valued, key=lambda item: (-item[0] if greater else item[0], item[1]["epoch"]))
    z = record.get("start_z")
    z = float(z) if by_spearman and isinstance(z, int | float) and not isinstance(z, bool) else None
    return {"epoch": int(record["epoch"]), "value": value, "start_z": z}


def _why_start(rule, best: dict | None, start_name: str) -> str:
    start = f"the fitted start ({start_name})"
    if best is None:
        return f"no trained epoch has a defined {rule.by}: {start} was the only candidate"
    told = f"best epoch {best['epoch'] + 1} {rule.by} {best['value']:.4f}"
    start_value = record_value(rule.start, rule.by)
    if rule.by_spearman:
        z = "" if best["start_z"] is None else f", z {best['start_z']:.2f}"
        if best["start_z"] is not None and best["start_z"] >= LEAVE_START_Z and start_value is not None:
            # above the noise, under the floor: say which rule held it back
            z += f" but {best['value'] - start_value:+.4f} (needs {LEAVE_START_GAIN:+})"
        return f"no trained epoch clearly above {start}: {told}{z}"
    against = "" if start_value is None else f" against {start_value:.4f}"
    return (
        f"no trained epoch clearly better than {start}: {told}{against} "
        f"(needs {LEAVE_START_REL_GAIN:.0%} {'higher' if rule.greater else 'lower'})"
    )


def _why_epoch(rule, record: dict | None, epoch: int | None, n_epochs: int, start_name: str) -> str:
    value = record_value(record, rule.by)
    shown = "undefined" if value is None else f"{value:.4f}"
    label = "an epoch" if epoch is None else f"epoch {epoch + 1}"
    if rule.start is not None:
        start_value = record_value(rule.start, rule.by)
        z = (record or {}).get("start_z")
        z = f", z {z:.2f}" if rule.by_spearman and isinstance(z, int | float) else ""
        better = "above" if rule.by_spearman else "better than"
        return (
            f"{label} clearly {better} the fitted start ({start_name}): {rule.by} {shown} "
            f"against {_num(start_value)}{z}"
        )
    extreme = "highest" if rule.greater else "lowest"
    plain = " (no validation rows)" if rule.by == "train_loss" else ""
    return f"{label}: the {extreme} {rule.by} of {n_epochs} trained epochs, {shown}{plain}"


def _name(model: str, epoch: int | None) -> str:
    return "start" if model == "start" else "closed-form fit" if model == "closed_form" else f"epoch {(epoch or 0) + 1}"


def _validation_values(record: dict | None) -> dict[str, tuple[float, bool]]:
    """The record's validation numbers with their direction: {"val_loss": (0.34, False), "val_mse": …}."""
    out: dict[str, tuple[float, bool]] = {}
    if not record:
        return out
    names = ["val_loss"] + [f"val_{m}" for m in (record.get("val") or {})]
    for name in names:
        greater = False if name == "val_loss" else greater_is_better(name[len("val_") :])
        value = record_value(record, name)
        if value is not None and greater is not None:
            out[name] = (value, greater)
    return out


def far_worse(kept: dict | None, others: list[dict], by: str, kept_name: str) -> str | None:
    """One line when the kept model is far worse (FAR_RATIO, FAR_GAP) than a trained epoch in `others` on a
    validation metric other than `by`: the validation loss when it is one of them, else the metric where it
    is worst. None otherwise."""
    mine = _validation_values(kept)
    worst: tuple[tuple[bool, float], str] | None = None
    for other in others:
        for name, (theirs, greater) in _validation_values(other).items():
            if name == by or name not in mine:
                continue
            value = mine[name][0]
            if greater:
                severity = (theirs - value) / FAR_GAP
                how = f"{theirs - value:.3f} below"
            else:
                if theirs <= 0:
                    continue
                ratio = value / theirs
                far = math.sqrt(FAR_RATIO) if name[len("val_") :] in ROOT_SCALE else FAR_RATIO
                severity = math.log(ratio) / math.log(far) if ratio > 0 else 0.0
                how = f"{ratio:.1f}x"
            # the training loss first (train.select_by: val_loss needs nothing added to the plan), then the
            # metric where the kept model is furthest past the line
            rank = (name == "val_loss", severity)
            if severity >= 1 and (worst is None or rank > worst[0]):
                at = record_value(other, by)
                here = record_value(kept, by)
                same = f" (at {by} {_num(here)} against {_num(at)})" if at is not None or here is not None else ""
                worst = (
                    rank,
                    f"the kept {kept_name}'s {name} {value:.4g} is {how} trained epoch {other['epoch'] + 1}'s "
                    f"{theirs:.4g}{same}; train.select_by: {name} would select on it",
                )
    return worst[1] if worst else None


def _num(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def summary(kept: dict) -> str:
    """The run's one-line account of the kept model (logs/train.log, stderr): `kept: start (val_spearman
    0.7697): no trained epoch clearly above the fitted start (ridge fit): best epoch 3 …`."""
    value = kept.get("value")
    shown = "undefined" if value is None else f"{value:.4f}"
    return f"kept: {_name(kept['model'], kept.get('epoch'))} ({kept['by']} {shown}): {kept['why']}"
