"""`infra compare --plot FILE.png`: the compared experiments side by side, drawn on the host.

Left: a bar per experiment (or per group, with the sd as an error bar) of the sort metric. Right:
each experiment's validation curve of that metric per epoch, read from its `metrics/metrics.jsonl`
(untrusted: through `runner.safefs`, size-capped, lines that are not objects of numbers skipped).
matplotlib is imported only here, so the host CLI runs without it; without it `--plot` is an
EnvironmentProblem naming the `plot` extra.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem, UsageError
from runner.run.compare import parse_metric, shown_value

CURVE_LIMIT = 8 << 20  # bytes of metrics.jsonl read per experiment
MAX_EPOCHS = 10_000


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise EnvironmentProblem(
            "--plot needs matplotlib, which this Python lacks; install the plot extra: pip install 'infra[plot]'"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def learning_curve(exp_dir: Path, split: str, metric: str) -> list[tuple[int, float]]:
    """(epoch, value) of `split` `metric` per epoch from the experiment's metrics.jsonl; [] when absent."""
    try:
        data = safefs.read_bytes(Path(exp_dir), "metrics/metrics.jsonl", limit=CURVE_LIMIT)
    except (FileNotFoundError, OSError, safefs.Tampered, safefs.TooLarge):
        return []
    points = []
    for line in data.decode("utf-8", "replace").splitlines()[:MAX_EPOCHS]:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        values = doc.get(split) if isinstance(doc, dict) else None
        epoch = doc.get("epoch") if isinstance(doc, dict) else None
        value = values.get(metric) if isinstance(values, dict) else None
        if isinstance(epoch, int) and isinstance(value, int | float) and not isinstance(value, bool | None):
            points.append((epoch, float(value)))
    return points


def _label(config: dict, fallback: str) -> str:
    text = " ".join(f"{k}={shown_value(v)}" for k, v in config.items())
    return text[:48] or fallback


def render(rows: list[dict], groups: list[dict] | None, metric: str, keys: list[str]) -> bytes:
    """The PNG bytes: bars of the test (or val) metric, and validation curves per experiment."""
    split, name = parse_metric(metric)
    plt = _pyplot()
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 5))
    if groups is not None:
        labels = [_label(g["config"], ", ".join(g["experiments"])[:48]) for g in groups]
        stats = [g[split].get(name) or {} for g in groups]
        heights = [s.get("mean") if s.get("mean") is not None else 0.0 for s in stats]
        errors = [s.get("sd") or 0.0 for s in stats]
        bars.bar(range(len(groups)), heights, yerr=errors, capsize=4, color="tab:blue")
        bars.set_title(f"{split} {name}: mean ± sd (n = {', '.join(str(s.get('n', 0)) for s in stats)})")
    else:
        labels = [_label({k: r["plan"].get(k) for k in keys}, r["experiment_id"]) for r in rows]
        heights = [r[split].get(name) if r[split].get(name) is not None else 0.0 for r in rows]
        bars.bar(range(len(rows)), heights, color="tab:blue")
        bars.set_title(f"{split} {name}")
    bars.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    bars.set_ylabel(name)
    drawn = 0
    for r in rows:
        points = learning_curve(Path(r["exp_dir"]), "val", name)
        if points:
            label = _label({k: r["plan"].get(k) for k in keys}, r["experiment_id"])
            curves.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
            drawn += 1
    curves.set_xlabel("epoch")
    curves.set_ylabel(f"val {name}")
    curves.set_title("learning curves" if drawn else "learning curves (none recorded)")
    if drawn:
        curves.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_target(path: str | Path) -> Path:
    """The checked `--plot` path (before anything is computed): a .png in an existing folder."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {path}: give a file name ending in .png")
    if not path.parent.is_dir():
        raise UsageError(f"--plot {path}: folder {path.parent} does not exist; create it first")
    return path


def write_plot(path: Path, png: bytes) -> None:
    """Write the PNG atomically (a temporary file renamed over `path`)."""
    safefs.write_atomic(path.parent.resolve(), path.name, png)
