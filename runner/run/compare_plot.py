"""`infra compare --plot FILE.png`: the compared experiments side by side, drawn on the host.

Left: the sort metric of every run as a point, and with `--group-by` each group's mean ± sd beside
its runs; the y axis is fitted to the values (differences of 0.01 stay visible), a group where some
runs have no value says `k/n` under its label. Right: the validation curve of that metric per epoch
(epochs counted from 1 as `infra run` shows them, 0 the fitted start when the run recorded one), one
curve per run, or with `--group-by` the mean curve of each group with a ± sd band. Labels are the
values of the plan keys that differ, nothing else. The curves come from each experiment's
`metrics/metrics.jsonl` (untrusted: through `runner.safefs`, size-capped, lines that are not objects
of numbers skipped). matplotlib is imported only here, so the host CLI runs without it; without it
`--plot` is an EnvironmentProblem naming the `plot` extra.
"""

from __future__ import annotations

import io
import json
import statistics
from pathlib import Path

from runner import safefs
from runner.errors import EnvironmentProblem, UsageError
from runner.run.compare import finite, parse_metric, shown_value
from runner.run.records import Experiment, clean_text

CURVE_LIMIT = 8 << 20  # bytes of metrics.jsonl read per experiment
MAX_EPOCHS = 10_000
LABEL_WIDTH = 28
LEGEND_MAX = 12  # more curves than this get no legend (the left panel names them)


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
    """(epoch counted from 1, value) of `split` `metric` per epoch from the experiment's metrics.jsonl,
    with (0, value) first for the fitted start when metrics.json recorded one; [] when absent."""
    try:
        data = safefs.read_bytes(Path(exp_dir), "metrics/metrics.jsonl", limit=CURVE_LIMIT)
    except (FileNotFoundError, OSError, safefs.Tampered, safefs.TooLarge):
        return []
    points: dict[int, float] = {}
    for line in data.decode("utf-8", "replace").splitlines()[:MAX_EPOCHS]:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        values = doc.get(split) if isinstance(doc, dict) else None
        epoch = doc.get("epoch") if isinstance(doc, dict) else None
        value = values.get(metric) if isinstance(values, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and 0 <= epoch < MAX_EPOCHS and finite(value):
            points[epoch + 1] = float(value)
    if points:
        start = Experiment(Path(exp_dir)).read_json("metrics/metrics.json").get("start")
        value = (
            start.get(split, {}).get(metric) if isinstance(start, dict) and isinstance(start.get(split), dict) else None
        )
        if finite(value):
            points[0] = float(value)
    return sorted(points.items())


def short_label(config: dict, fallback: str) -> str:
    """A label from the differing keys' values only: the value alone for one key, else `key=value`
    with the key's last part (`model=cnn`, `seed=1`; `model.name` is `model`), one per line, each cut
    to LABEL_WIDTH. A key this run or group does not have (`channels` of an `mlp`) is left out."""

    def plain(label: str) -> str:  # matplotlib reads `$…$` as math: a plan value must stay text
        return (clean_text(label, LABEL_WIDTH) or "").replace("$", r"\$")

    config = {k: v for k, v in config.items() if v is not None}
    if not config:
        return plain(fallback)
    if len(config) == 1:
        return plain(shown_value(next(iter(config.values())))) or plain(fallback)
    short = {k: k.removesuffix(".name").rsplit(".", 1)[-1] for k in config}
    if len(set(short.values())) < len(short):
        short = {k: k for k in config}
    lines = [plain(f"{short[k]}={shown_value(v)}") for k, v in config.items()]
    return "\n".join(line for line in lines if line) or plain(fallback)


def _color(i: int):
    import matplotlib

    return matplotlib.colormaps["tab10"](i % 10)


def render(rows: list[dict], groups: list[dict] | None, metric: str, keys: list[str]) -> bytes:
    """The PNG bytes of `draw`."""
    plt = _pyplot()
    fig = draw(rows, groups, metric, keys)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def draw(rows: list[dict], groups: list[dict] | None, metric: str, keys: list[str]):
    """The figure: the metric per run (and per group) on the left, validation curves on the right."""
    split, name = parse_metric(metric)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    by_id = {r["experiment_id"]: r for r in rows}
    if groups is None:  # every run its own group, labelled by its differing keys, coloured by the first
        sets = [([r], short_label({k: r["plan"].get(k) for k in keys}, r["experiment_id"])) for r in rows]
        first = [json.dumps(r["plan"].get(keys[0]), default=str) if keys else "" for r in rows]
        shade = {v: i for i, v in enumerate(dict.fromkeys(first))}
        colors = [_color(shade[v]) for v in first]
        names = [short_label({keys[0]: r["plan"].get(keys[0])}, "") if keys else None for r in rows]
    else:
        sets = [([by_id[i] for i in g["experiments"]], short_label(g["config"], "all")) for g in groups]
        colors = [_color(i) for i in range(len(sets))]
        names = [label for _, label in sets]
    width = min(16.0, 9.0 + 0.25 * len(sets))
    fig, (left, right) = plt.subplots(1, 2, figsize=(width, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
    labels = []
    bottom = left.get_xaxis_transform()  # x in data, y in axes: undefined values sit on the axis
    for x, (members, label) in enumerate(sets):
        color = colors[x]
        values = [r[split][name] for r in members if finite(r[split].get(name))]
        missing = len(members) - len(values)
        spread = 0.12 if len(members) > 1 else 0.0
        offsets = [
            spread * (2 * j / max(1, len(members) - 1) - 1) if len(members) > 1 else 0.0 for j in range(len(members))
        ]
        left.scatter(
            [x + o for o in offsets[: len(values)]], values, s=22, color=color, alpha=0.75, zorder=3, edgecolors="none"
        )
        if missing:
            left.scatter([x + o for o in offsets[len(values) :]], [0.03] * missing, marker="x", s=24, color="0.45",
                         transform=bottom, zorder=3, clip_on=False)  # fmt: skip
        if groups is not None and values:
            mean = statistics.fmean(values)
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            face = color if not missing else "white"  # hollow: a mean over some of the runs only
            left.errorbar(x + 0.28, mean, yerr=sd, fmt="D", ms=6, color=color, ecolor=color, capsize=5, zorder=4,
                          markerfacecolor=face)  # fmt: skip
        labels.append(label + (f"\n{len(values)}/{len(members)} with a value" if missing else ""))
    left.set_xticks(
        range(len(sets)),
        labels,
        rotation=30 if len(sets) > 4 else 0,
        ha="right" if len(sets) > 4 else "center",
        fontsize=8,
    )
    left.set_xlim(-0.6, len(sets) - 0.4)
    left.margins(y=0.15)
    left.grid(axis="y", alpha=0.3)
    left.set_ylabel(f"{split} {name}")
    title = f"{split} {name} per run"
    if groups is not None:
        over = ", ".join(groups[0]["grouped_over"]) if groups else ""
        title += f"\n◆ mean ± sd over {over}"
    if any(len(m) > sum(finite(r[split].get(name)) for r in m) for m, _ in sets):
        title += ("; " if groups is not None else "\n") + "× no value" + ("; ◇ mean of the rest" if groups else "")
    left.set_title(title, fontsize=10)

    drawn, legend = 0, set()
    for x, (members, _) in enumerate(sets):
        curves = [c for c in (learning_curve(Path(r["exp_dir"]), "val", name) for r in members) if c]
        if not curves:
            continue
        color, label = colors[x], names[x] and names[x].replace("\n", " ")  # a legend entry is one line
        if label in legend:
            label = None
        legend.add(label)
        if groups is None or len(curves) == 1:
            for curve in curves:
                right.plot(*zip(*curve, strict=True), marker="o", ms=3, color=color, label=label, lw=1.2, alpha=0.85)
                label = None
        else:
            epochs = sorted({e for c in curves for e, _ in c})
            table = [dict(c) for c in curves]
            means, lows, highs = [], [], []
            for e in epochs:
                at = [t[e] for t in table if e in t]
                m = statistics.fmean(at)
                sd = statistics.stdev(at) if len(at) > 1 else 0.0
                means.append(m), lows.append(m - sd), highs.append(m + sd)
            right.plot(epochs, means, marker="o", ms=3, color=color, lw=1.6, label=f"{label} (n={len(curves)})")
            right.fill_between(epochs, lows, highs, color=color, alpha=0.18, lw=0)
        drawn += 1
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.margins(y=0.1)
    right.grid(alpha=0.3)
    right.set_xlabel("epoch (0: the fitted start)")
    right.set_ylabel(f"val {name}")
    what = "mean ± sd per group" if groups is not None else "per run"
    right.set_title(f"learning curves, {what}" if drawn else "learning curves (none recorded)", fontsize=10)
    if drawn and 0 < len(legend - {None}) <= LEGEND_MAX:
        right.legend(fontsize=7, loc="best")
    return fig


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
