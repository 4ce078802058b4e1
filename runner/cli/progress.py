"""What `infra run` shows while it works: phases, one line per epoch, a summary at the end.

    RunView(mode, workdir) → .options() gives RunOptions' callbacks → the run path reports to it:
    image decision and build lines, state changes, training output lines → .finish(doc) the summary.

Modes: "live" (a terminal: a rich spinner/progress line under the lines already done), "plain"
(not a terminal: one compact line per phase and per epoch), "verbose" (plain, plus the raw build
and training output as it comes), "quiet" (nothing; the caller prints the result line).

Epoch numbers come from the core's structured events (`logs/events.jsonl` in the experiment),
never from its printed output: the file is the training's record of what happened, whatever its
log format, the log cap or `-v` do to the output. The file is untrusted (the training writes it):
it is read without following links, a bounded amount at a time, and only records of the expected
shape, with finite numbers, are shown. The core writes each epoch's event before it logs the
epoch's line, so every output line is a cue to read what is new.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from runner import safefs
from runner.cli.output import say
from runner.lines import terminal_safe

CORE_EVENTS = "logs/events.jsonl"
READ_CHUNK = 1 << 20  # most bytes of events read per cue
LINE_CAP = 1 << 16  # a longer events line is not a record of ours: skipped
EPOCH_KEYS = ("train_loss", "val_loss", "val_spearman")
_BUILD_START = re.compile(r"^infra: building the (\w+) image (\S+)$")
_BUILD_DONE = re.compile(r"^infra: built (\S+) in ([\d.]+) s$")
_BUILD_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
# Training output that reaches the user without -v: warnings (the log's level name, Python's
# warnings); errors reach the user through the error boundary with the log's tail.
_WARNING = re.compile(r"\b(WARNING|[A-Za-z]*Warning):")
# the plm embedding stage (runner/core/plm.py): its progress, and where its features came from
_EMBEDDING = re.compile(r"\bembedding: (\d+)/(\d+) sequences")
_EMBEDDING_CACHED = re.compile(r"\bplm: (\d+) sequences' features read from the embedding cache")


# --- reading the core's events -------------------------------------------------------------------


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


@dataclass
class Epoch:
    """One epoch as shown: 0-based `index` (as in the events), the three numbers (None when absent)."""

    index: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_spearman: float | None = None
    # the core's word on whether this epoch became ckpts/best.ckpt (None: not said, e.g. no
    # validation rows, or an older core): with a fitted start that is not simply the best val_spearman
    best: bool | None = None

    @classmethod
    def from_event(cls, doc: dict) -> Epoch | None:
        index = doc.get("epoch")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 10**7:
            return None
        best = doc.get("best")
        return cls(index, *(_number(doc.get(key)) for key in EPOCH_KEYS), best if isinstance(best, bool) else None)


class CoreEvents:
    """New records of an experiment's `logs/events.jsonl`, read from where the last read stopped."""

    def __init__(self, exp_root: Path, from_start: bool):
        self.root = exp_root
        self.offset = 0 if from_start else self._size()
        self.partial = b""

    def _size(self) -> int:
        try:
            with safefs.open_read(self.root, CORE_EVENTS) as fh:
                return os.fstat(fh.fileno()).st_size
        except (FileNotFoundError, safefs.Tampered, OSError):
            return 0

    def read(self) -> list[dict]:
        """The complete, well-formed JSON object lines added since the last call (at most READ_CHUNK bytes)."""
        try:
            with safefs.open_read(self.root, CORE_EVENTS) as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:  # replaced (a rerun moved the old one away): start over
                    self.offset, self.partial = 0, b""
                fh.seek(self.offset)
                data = fh.read(min(size - self.offset, READ_CHUNK))
        except (FileNotFoundError, safefs.Tampered):
            return []
        self.offset += len(data)
        *lines, rest = (self.partial + data).split(b"\n")
        self.partial = rest if len(rest) <= LINE_CAP else b""
        docs = []
        for line in lines:
            if len(line) > LINE_CAP:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("event"), str):
                docs.append(doc)
        return docs


_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,72}$")


def _index(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**7 else None


@dataclass
class Kept:
    """The core's `kept` record (its `{"phase": "kept"}` event, metrics.json), checked field by field."""

    model: str  # start, epoch or closed_form
    by: str
    epoch: int | None = None
    value: float | None = None
    best_epoch: int | None = None
    best_value: float | None = None
    best_z: float | None = None

    @classmethod
    def from_doc(cls, doc) -> Kept | None:
        if not isinstance(doc, dict) or doc.get("model") not in ("start", "epoch", "closed_form"):
            return None
        by = doc.get("by")
        if not isinstance(by, str) or not _NAME.match(by):
            return None
        best = doc.get("best_trained") if isinstance(doc.get("best_trained"), dict) else {}
        return cls(
            doc["model"],
            by,
            _index(doc.get("epoch")),
            _number(doc.get("value")),
            _index(best.get("epoch")),
            _number(best.get("value")),
            _number(best.get("start_z")),
        )


def kept_text(kept: Kept) -> str:
    """`kept: start (val_spearman 0.7697); best trained epoch 3, val_spearman 0.7607, not clearly above it
    (z 0.41)`: what the run delivers, epochs counted from 1 as in the epoch lines."""

    def shown(value: float | None) -> str:
        return "undefined" if value is None else f"{value:.4f}"

    if kept.model == "closed_form":
        return f"kept: the closed-form fit ({kept.by} {shown(kept.value)})"
    if kept.model == "epoch":
        head = f"kept: epoch {(kept.epoch or 0) + 1} ({kept.by} {shown(kept.value)})"
        return head + (f", {kept.best_z:.2f} standard errors above the start" if kept.best_z is not None else "")
    head = f"kept: start ({kept.by} {shown(kept.value)})"
    if kept.best_epoch is None:
        return f"{head}; no trained epoch has a {kept.by}"
    z = f" (z {kept.best_z:.2f})" if kept.best_z is not None else ""
    return (
        f"{head}; best trained epoch {kept.best_epoch + 1}, {kept.by} {shown(kept.best_value)}, "
        f"not clearly {'above' if kept.best_z is not None else 'better than'} it{z}"
    )


def undefined_text(undefined) -> str | None:
    """`undefined: test spearman (constant predictions), …` for the val and test metrics reported as null."""
    if not isinstance(undefined, dict):
        return None
    shown = []
    for key, why in list(undefined.items())[:32]:
        if isinstance(key, str) and _NAME.match(key) and key.startswith(("val.", "test.")) and isinstance(why, str):
            split, _, metric = key.partition(".")
            shown.append(f"{split} {metric} ({_short(terminal_safe(why), 60)})")
    return f"undefined: {', '.join(shown)}" if shown else None


# --- text ---------------------------------------------------------------------------------------


def best_rank(epoch: Epoch) -> tuple[int, float] | None:
    """Lower is better, for epochs the core did not mark (`Epoch.best` None): highest val_spearman, else lowest
    val_loss, else train_loss."""
    for priority, key in enumerate(("val_spearman", "val_loss", "train_loss")):
        value = getattr(epoch, key)
        if value is not None:
            return priority, -value if key == "val_spearman" else value
    return None


def epoch_text(epoch: Epoch, max_epochs: int | None, best: bool = False) -> str:
    """`epoch 3/20  train_loss 0.4120  val_loss 0.4550  val_spearman 0.7010  best` (1-based, as people count)."""
    total = f"/{max_epochs}" if max_epochs else ""
    parts = [f"epoch {epoch.index + 1}{total}"]
    parts += [f"{key} {value:.4f}" for key in EPOCH_KEYS if (value := getattr(epoch, key)) is not None]
    return "  ".join(parts) + ("  best" if best else "")


def metrics_text(metrics: dict) -> str:
    """`spearman 0.7565  pearson 0.7593 …`: the finite numbers of a metrics object, in its order."""
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if _number(v) is not None)


def split_text(sizes: dict) -> str:
    shown = [f"{name} {sizes[name]}" for name in ("train", "val", "test") if isinstance(sizes.get(name), int)]
    return ", ".join(shown)


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the view -----------------------------------------------------------------------------------


@dataclass
class _Progress:
    """What the view knows so far."""

    events: CoreEvents | None = None
    max_epochs: int | None = None
    epochs: dict[int, Epoch] = field(default_factory=dict)
    best: tuple[int, float] | None = None
    build_tag: str | None = None
    kept: Kept | None = None  # the core's account of the delivered model
    undefined: dict | None = None  # metrics reported as null, with the reason (the `done` event)


class RunView:
    """Renders one run (or one sweep point) in `mode`; see the module docstring."""

    def __init__(self, mode: str, workdir: Path, title: str | None = None, console=None):
        if mode not in ("live", "plain", "verbose", "quiet"):
            raise ValueError(f"unknown view mode {mode!r}")
        self.mode = mode
        self.workdir = workdir
        self.state = _Progress()
        self.console = console
        self.progress = None
        self.task = None
        if mode == "live":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

            self.console = console or Console(stderr=True)
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("validating the plan", total=None)
            self.progress.start()
        if title:
            self._line(title, style="bold")

    # --- output ---

    def _line(self, text: str, style: str | None = None) -> None:
        """One permanent line (above the live line on a terminal). Training output arrives terminal-safe
        with its SGR colours kept; rich turns those into styles rather than printing them."""
        if self.mode == "quiet":
            return
        if self.mode == "live":
            from rich.text import Text

            shown = Text.from_ansi(text, style=style or "") if "\x1b" in text else Text(text, style=style or "")
            self.console.print(shown, highlight=False, soft_wrap=True)
        else:
            say(text)

    def _status(self, text: str, completed: int | None = None, total: int | None = None) -> None:
        if self.progress is not None:
            # drawn now, not at the next tick: a build step or an epoch may take less than a tick
            self.progress.update(self.task, description=text, completed=completed or 0, total=total, refresh=True)

    # --- callbacks for RunOptions ---

    def options(self) -> dict:
        """The RunOptions callbacks that feed this view."""
        return {
            "on_log": self.training_line,
            "on_build_log": self.build_line,
            "on_event": self.event,
            "on_phase": self.phase,
        }

    def validated(self, name: str, source: str) -> None:
        self._line(f"validate: plan {name!r} ok ({source})")
        self._status("preparing the image")

    def phase(self, phase: dict) -> None:
        if phase.get("phase") == "image" and phase.get("reused"):
            self._line(f"image: {phase.get('tag')} (reused)")
        elif phase.get("phase") == "image":
            self._line(f"image: {phase.get('tag')} is built when the experiment starts")

    def build_line(self, line: str) -> None:
        # A build's RUN steps print what the workdir's requirements print: shown terminal-safe
        # (build.log keeps the bytes).
        line = terminal_safe(line)
        if self.mode == "verbose":
            say(line)
        if started := _BUILD_START.match(line):
            self.state.build_tag = started.group(2)
            self._line(f"build: the {started.group(1)} image {started.group(2)} (log: build.log)")
            self._status(f"building {started.group(2)}")
        elif done := _BUILD_DONE.match(line):
            self._line(f"build: {done.group(1)} built in {float(done.group(2)):.0f} s")
            self._status("starting")
        elif step := _BUILD_STEP.match(line):
            n, total, what = int(step.group(1)), int(step.group(2)), step.group(3)
            self._status(f"building {self.state.build_tag or 'the image'}: {_short(what, 50)}", n - 1, total)

    def event(self, event: dict) -> None:
        kind, exp_id = event.get("event"), event.get("experiment_id")
        if kind in ("state", "attached") and self.state.events is None and exp_id:
            root = self.workdir / "experiments" / exp_id
            # a new attempt shows its own epochs; attaching shows the running attempt's so far
            self.state.events = CoreEvents(root, from_start=kind == "attached")
        if self.state.events is not None and isinstance(event.get("outputs"), str):
            # a study point's output folders sit in its slot while it runs (runner.run.slots)
            self.state.events.root = Path(event["outputs"])
        if kind == "reused":
            self._line(f"experiment {exp_id}: already succeeded (reported, not rerun; --rerun runs it again)")
        elif kind == "attached":
            self._line(f"experiment {exp_id}: already {event.get('state')}; following it")
            self._status("training")
            self.poll()
        elif kind == "state":
            state = event.get("state")
            attempt = f" (attempt {event['attempt']})" if state == "created" and event.get("attempt") else ""
            if state in ("created", "starting", "running", "building"):
                self._line(f"experiment {exp_id}: {state}{attempt}")
                self._status("training" if state == "running" else state)
            else:
                self.poll()
                self._line(f"experiment {exp_id}: {state}", style="bold green" if state == "succeeded" else "bold red")

    def training_line(self, line: str) -> None:
        if self.mode == "verbose":
            say(line)
        elif _WARNING.search(line):
            self._line(line, style="yellow")
        elif step := _EMBEDDING.search(line):
            done, total = int(step.group(1)), int(step.group(2))
            self._status(f"embedding {done}/{total} sequences", done, total)
            if done == total:
                self._line(f"embedding: {total} sequences computed (kept in the embedding cache)")
                self._status("training")
        elif cached := _EMBEDDING_CACHED.search(line):
            self._line(f"embedding: {cached.group(1)} sequences read from the embedding cache")
        self.poll()

    # --- the core's events ---

    def poll(self) -> None:
        """Show what the core recorded since the last look."""
        if self.state.events is None or self.mode == "quiet":
            return
        for doc in self.state.events.read():
            kind = doc.get("event")
            if kind == "epoch":
                epoch = Epoch.from_event(doc)
                if epoch is not None:
                    self._epoch(epoch)
            elif kind == "progress":
                self._progress(doc)

    def _progress(self, doc: dict) -> None:
        phase = doc.get("phase")
        if phase == "data" and isinstance(doc.get("n_selected"), int):
            sizes = doc.get("split") if isinstance(doc.get("split"), dict) else {}
            self._line(f"data: {doc['n_selected']} variants ({split_text(sizes)})")
        elif phase == "resume":
            self._line("train: resuming from the last checkpoint")
        elif phase == "train":
            max_epochs = doc.get("max_epochs")
            if isinstance(max_epochs, int) and not isinstance(max_epochs, bool) and max_epochs > 0:
                self.state.max_epochs = max_epochs
            self._line(f"train: up to {self.state.max_epochs or '?'} epochs")
            self._status("training", 0, self.state.max_epochs)
        elif phase == "kept":
            self.state.kept = Kept.from_doc(doc)
        elif phase == "done":
            if isinstance(doc.get("undefined"), dict):
                self.state.undefined = doc["undefined"]
            self._status("evaluated; writing the summary")

    def _epoch(self, epoch: Epoch) -> None:
        self.state.epochs[epoch.index] = epoch
        if epoch.best is not None:
            best = epoch.best
        else:
            rank = best_rank(epoch)
            best = rank is not None and (self.state.best is None or rank < self.state.best)
            if best:
                self.state.best = rank
        if self.mode != "verbose":  # with -v the core's own epoch line is already shown
            self._line(epoch_text(epoch, self.state.max_epochs, best))
        self._status(f"training (epoch {epoch.index + 1} done)", epoch.index + 1, self.state.max_epochs)

    # --- the end ---

    def stop(self) -> None:
        """Take the live line away (before the result or an error is printed)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def finish(self, doc: dict, table: bool = True) -> None:
        """The summary of a finished run: a table on a terminal, compact lines otherwise."""
        self.poll()
        self.stop()
        if self.mode == "quiet":
            return
        test, val = doc.get("test") or {}, doc.get("val") or {}
        if self.mode == "live" and table and (test or val):
            self.console.print(summary_table(doc))
            self._line(summary_footer(doc, self.state), style="dim")
        else:
            if val:
                self._line(f"val: {metrics_text(val)}")
            if test:
                self._line(f"test: {metrics_text(test)}")
        # what the numbers above belong to, and which of them are missing and why
        kept = self.state.kept or Kept.from_doc(doc.get("kept"))
        if kept is not None:
            self._line(kept_text(kept))
        if gaps := undefined_text(self.state.undefined or doc.get("undefined")):
            self._line(gaps, style="yellow")


def summary_table(doc: dict):
    """The rich table of a finished run: one row per metric (val, test), then where everything is."""
    from rich.table import Table

    test, val = doc.get("test") or {}, doc.get("val") or {}
    table = Table(title=f"{doc.get('experiment_id')} {doc.get('state') or ''}".strip(), title_justify="left")
    table.add_column("metric")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    for name in [*test, *(k for k in val if k not in test)]:
        cells = [_number(m.get(name)) for m in (val, test)]
        table.add_row(name, *("-" if c is None else f"{c:.4f}" for c in cells))
    return table


def summary_footer(doc: dict, state: _Progress | None = None) -> str:
    """The line under the summary: epochs, split sizes, where the experiment is."""
    parts = []
    if state is not None and state.epochs:
        parts.append(f"{len(state.epochs)} epochs")
    if sizes := split_text(doc.get("n") or {}):
        parts.append(sizes)
    parts.append(str(doc.get("exp_dir")))
    return "; ".join(parts)


def view_mode(*, quiet: bool, verbose: bool, machine: bool, stream=None) -> str:
    """The mode for these flags: machine outputs (--json/--events) and --quiet print no progress;
    -v the raw lines; otherwise live on a terminal (unless TERM=dumb), plain text when not."""
    import sys

    stream = stream or sys.stderr
    if machine or quiet:
        return "quiet"
    if verbose:
        return "verbose"
    return "live" if stream.isatty() and os.environ.get("TERM") != "dumb" else "plain"
