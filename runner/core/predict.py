"""`python -m runner.core.predict`: score mutants of an experiment's template with its trained model.

What `infra predict` runs inside the experiment's own image (or as a host process with `--backend
local`). The model is rebuilt from the checkpoint's saved hyper-parameters with the experiment's
plugins; the template, vocabulary and target transform come from `config/predict.json`, which the
training writes (`save_predict_state`), so no database is needed at predict time.

The data path is the training's: mutants stay one byte buffer (`runner.core.variants`), are parsed
and scattered into a uint8 token matrix without a per-row Python loop, and are scored in bounded
chunks under `torch.inference_mode`. Mutants are checked by the importer's own parser
(`runner.data.mutants`): a row the importer would refuse (bad syntax, one position twice, a residue
outside the 20 standard amino acids and '*', a position outside the template, a wild-type letter
that does not match) or whose new residue the vocabulary lacks is kept in the output with the same
message in `error` and no prediction. The input's other columns are kept (as text), and each row
says whether its sequence is one of the experiment's measured variants (`measured`) and of its
training split (`in_train`). Rows stream to a temporary file renamed into place at the end;
`--top N` keeps only the N best, merged chunk by chunk.

Exit codes: 0 done (some rows may carry errors), 2 bad input (no `mutant` column, an unreadable
file, no usable row at all: the file is still written so every row's error can be read), 1 any
other failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.core.variants import REASONS, MutantText, MutationResult, apply_mutants
from runner.core.vocab import IUPAC_AMINO_ACIDS, BaseVocabProcessor
from runner.data.mutants import problem_text
from runner.errors import DataError, InfraError
from runner.plan.models import Plan
from runner.run.jobs import PREDICT_MAX_TEMPLATE

log = logging.getLogger(__name__)

PREDICT_STATE = "config/predict.json"
TARGET_SORTED = "config/target_sorted.npy"  # the rank transform's training targets (its inverse needs them)
STATE_FORMAT = 1
CHUNK_ROWS = 1 << 16  # variants parsed and encoded at a time: 20 MB of tokens at length 300
SCORE_BATCH = 8192  # rows per model call, as in the training's own predictions
# The result's own columns, after `mutant` and the input's other columns (the host checks this order).
RESULT_FIELDS = [("sequence", pa.large_string()), ("prediction", pa.float64()), ("error", pa.string()),
                 ("measured", pa.bool_()), ("in_train", pa.bool_())]  # fmt: skip
# Names infra writes (here or in an ensemble's merge): an input column of such a name is renamed input_<name>.
RESERVED_NAMES = ("sequence", "prediction", "error", "measured", "in_train", "std", "n", "ucb")


def output_schema(input_columns: list[str] | tuple[str, ...] = ()) -> pa.Schema:
    """`mutant`, the input's other columns (text, already renamed), then RESULT_FIELDS."""
    text = [(name, pa.large_string()) for name in input_columns]
    return pa.schema([("mutant", pa.large_string()), *text, *RESULT_FIELDS])


OUTPUT_SCHEMA = output_schema()


def output_column_names(input_names: list[str]) -> list[str]:
    """The output names of the input's columns other than `mutant`: a name infra writes itself
    becomes input_<name>. ValueError when two columns would share a name."""
    out = [f"input_{name}" if name in RESERVED_NAMES else name for name in input_names]
    seen: dict[str, str] = {}
    for name, given in zip(out, input_names, strict=True):
        if name in seen or name == "mutant":
            first = seen.get(name, "mutant")
            raise ValueError(f"columns {first!r} and {given!r} would both be written as {name!r}; rename one")
        seen[name] = given
    return out


# --- what the training leaves for prediction ------------------------------------------------------


def save_predict_state(layout, plan: Plan, variants, transform, task: str) -> None:
    """Write `config/predict.json` (+ `config/target_sorted.npy` for the rank transform): everything
    prediction needs besides the checkpoint and plugins: templates, vocab (`plan.vocab`), length,
    task, target, transform."""
    state = transform.state()
    if transform.name == "rank":
        import io

        buf = io.BytesIO()
        np.save(buf, np.asarray(transform._sorted, dtype=np.float64), allow_pickle=False)
        layout.write_bytes(TARGET_SORTED, buf.getvalue())
        state["sorted_file"] = TARGET_SORTED
    layout.write_json(
        PREDICT_STATE,
        {
            "format": STATE_FORMAT,
            "task": task,
            "target": plan.data.target,
            "vocab": {"name": plan.vocab.name, "params": dict(plan.vocab.params)},
            "seq_len": int(variants.tokens.shape[1]),
            "sources": [
                {"name": n, "template": t} for n, t in zip(variants.source_names, variants.templates, strict=True)
            ],
            "transform": state,
        },
    )


def write_predictions_csv(layout, frame, sequences) -> None:
    """`artifacts/predictions.csv`: the twin of predictions.parquet, with each variant's sequence."""
    import io

    import pyarrow.csv as pacsv

    table = pa.Table.from_pandas(frame.assign(sequence=sequences), preserve_index=False)
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    layout.write_bytes("artifacts/predictions.csv", buf.getvalue())


# --- the model and its template -------------------------------------------------------------------


@dataclass
class Scored:
    """One chunk's outcome, row-aligned with its input."""

    prediction: np.ndarray  # float64 per input row (NaN where the row has an error)
    reason: np.ndarray  # int8 per input row: 0 fine, else 1 + index into REASONS
    tokens: np.ndarray  # uint8 N_kept × L of the rows without an error
    result: MutationResult | None = None  # the parse and its problems: the error rows' messages come from it
    text: MutantText | None = None  # the mutants as parsed


@dataclass
class KnownVariants:
    """The experiment's measured sequences of one template (data/selected.parquet) and those of its
    training split (splits/train.npy), upper-cased, each None when the experiment cannot tell."""

    measured: pa.Array | None = None
    train: pa.Array | None = None

    @classmethod
    def load(cls, exp_dir: Path, source: str) -> KnownVariants:
        """Read once per prediction. An experiment without the files (trained before they were
        written, or damaged) gets null flags and one log line, not an error."""
        import pyarrow.parquet as pq

        path = Path(exp_dir) / "data/selected.parquet"
        try:
            table = pq.read_table(path, columns=["id", "sequence", "source_text"])
            ids = table.column("id").to_numpy()
            same = pc.equal(table.column("source_text").cast(pa.large_string()), source)
            sequence = pc.ascii_upper(table.column("sequence").cast(pa.large_string()))
            mine = pc.and_kleene(same, pc.is_valid(sequence))
            measured = pc.unique(sequence.filter(mine))  # an Array: is_in's value set
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            log.info("measured/in_train: cannot tell, %s is not readable (%s); those columns stay empty", path, exc)
            return cls()
        train_path = Path(exp_dir) / "splits/train.npy"
        try:
            train_ids = np.asarray(np.load(train_path, allow_pickle=False), dtype=np.int64)
        except (OSError, ValueError, TypeError) as exc:
            log.info("in_train: cannot tell, %s is not readable (%s); that column stays empty", train_path, exc)
            return cls(measured)
        in_train = pa.array(np.isin(ids, train_ids))
        train = pc.unique(sequence.filter(pc.and_kleene(mine, in_train)))
        return cls(measured, train)

    def flags(self, sequence: pa.Array) -> tuple[pa.Array, pa.Array]:
        """(measured, in_train) per row: null where the row has no sequence or the experiment cannot tell.

        `is_in` hashes its value set on every call (0.17 s per 65,536-row chunk against 500,000
        known sequences of length 300), so the training set is only asked about the rows that
        are measured at all: none, for new designs."""
        n = len(sequence)
        if self.measured is None:
            return pa.nulls(n, pa.bool_()), pa.nulls(n, pa.bool_())
        missing = ~pc.is_valid(sequence).to_numpy(zero_copy_only=False)
        upper = pc.ascii_upper(sequence)
        measured = pc.is_in(upper, value_set=self.measured).to_numpy(zero_copy_only=False) & ~missing
        if self.train is None:
            return pa.array(measured, mask=missing), pa.nulls(n, pa.bool_())
        in_train = np.zeros(n, dtype=bool)
        rows = np.flatnonzero(measured)
        if rows.size:
            in_train[rows] = pc.is_in(upper.take(pa.array(rows)), value_set=self.train).to_numpy(zero_copy_only=False)
        return pa.array(measured, mask=missing), pa.array(in_train, mask=missing)


class Predictor:
    """A trained experiment ready to score mutants of one template."""

    def __init__(
        self,
        module,
        vocab: BaseVocabProcessor,
        template: str,
        seq_len: int,
        transform,
        task: str,
        known: KnownVariants | None = None,
    ):
        import torch

        self.module, self.vocab, self.template = module, vocab, template
        self.seq_len, self.transform, self.task = int(seq_len), transform, task
        self.known = known if known is not None else KnownVariants()
        # buffers too: a closed-form model (ridge) has no parameters, only buffers
        self.device = next(itertools.chain(module.parameters(), module.buffers()), torch.zeros(0)).device
        covariates = _covariate_embedding(module)
        # data.covariates of the training: every row to score needs their values (input columns)
        self.covariates: list[str] = list(covariates.names) if covariates is not None else []

    def score_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Model scores of a token matrix on the original target scale (the transform inverted)."""
        import torch

        out = np.empty(len(tokens), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(tokens), SCORE_BATCH):
                batch = torch.from_numpy(tokens[start : start + SCORE_BATCH]).to(self.device)
                out[start : start + len(batch)] = self.module.scores(self.module(batch)).cpu().numpy()
        return out if self.task == "classification" else self.transform.inverse(out)

    def score(self, mutants: MutantText, covariates: np.ndarray | None = None) -> Scored:
        """Parse, check, encode and score one chunk of mutants; with data.covariates, `covariates` are
        the rows' values (N × K, in the training's column order)."""
        n = len(mutants)
        if self.covariates and (covariates is None or np.shape(covariates) != (n, len(self.covariates))):
            raise DataError(
                f"the experiment was trained with data.covariates ({', '.join(self.covariates)}): give each "
                "mutant's values as columns of the input file"
            )
        # standard=True: the importer's rules (runner.data.mutants), so a row it would refuse is an error here too
        result = apply_mutants(
            [self.template], np.zeros(n, np.int64), mutants, self.vocab, on_mismatch="drop", standard=True
        )
        tokens = result.tokens
        if tokens.shape[1] < self.seq_len:  # a shorter template of a multi-source training
            tokens = np.pad(tokens, ((0, 0), (0, self.seq_len - tokens.shape[1])), constant_values=self.vocab.pad_id)
        prediction = np.full(n, np.nan)
        if self.covariates:  # the chunk's covariates, by sequence, standardised as in training
            _covariate_embedding(self.module).set_rows(tokens, np.asarray(covariates)[result.keep], scratch=True)
        embed = _prepared_embedding(self.module)
        if embed is not None and len(tokens):
            # the chunk's features at once, batched, from the cache when this input was predicted before
            embed.prepare(tokens, [self.template], None, scratch=True)
        prediction[result.keep] = self.score_tokens(tokens)
        return Scored(prediction, result.reason, tokens, result, mutants)

    def sequences(self, tokens: np.ndarray) -> pa.Array:
        """The template-length sequences of a token matrix as an Arrow string array (no per-row loop)."""
        width = len(self.template)
        letters = np.ascontiguousarray(self.vocab.inverse[tokens[:, :width]])
        offsets = np.arange(len(tokens) + 1, dtype=np.int64) * width
        return pa.LargeStringArray.from_buffers(len(tokens), pa.py_buffer(offsets), pa.py_buffer(letters))

    def errors(self, scored: Scored, mutants: pa.Array | None = None) -> pa.Array:
        """The `error` text per row (null where it was predicted): the importer's message for the
        same mutant (`runner.data.mutants.problem_text`); only the error rows' texts are built.
        `mutants` (the chunk as given) lets a message quote a line break as the importer does."""
        bad = np.flatnonzero(scored.reason != 0)
        if bad.size == 0:
            return pa.nulls(len(scored.reason), pa.string())
        result, text = scored.result, scored.text
        if mutants is not None:
            given = mutants.cast(pa.large_string()).take(pa.array(bad))
            strings = pc.utf8_trim_whitespace(pc.fill_null(given, "?")).to_pylist()
        else:
            starts = text.row_starts()
            strings = [text.buf[starts[r] : text.row_ends[r]].tobytes().decode("utf-8", "replace") for r in bad]
        vocab = f"{self.vocab.name!r} ({self.vocab.alphabet})"
        messages = [
            problem_text(result.problems, int(row), result.parsed, mutant, self.template, vocab)
            for row, mutant in zip(bad, strings, strict=True)
        ]
        index = np.cumsum(scored.reason != 0) - 1
        return pa.array(messages, pa.string()).take(pa.array(index, mask=scored.reason == 0))

    def table(self, mutants: pa.Array, scored: Scored, inputs: pa.Table | None = None) -> pa.Table:
        """The output rows of a chunk: mutant, the input's other columns (`inputs`, text, named as
        they are written), sequence, prediction, error, measured, in_train (nulls where they do not apply)."""
        ok = scored.reason == 0
        kept_index = np.cumsum(ok) - 1
        sequence = self.sequences(scored.tokens).take(pa.array(kept_index, mask=~ok))
        measured, in_train = self.known.flags(sequence)
        names = list(inputs.column_names) if inputs is not None else []
        columns = [mutants.cast(pa.large_string())]
        columns += [inputs.column(i) for i in range(len(names))] if inputs is not None else []
        columns += [sequence, pa.array(scored.prediction, mask=~ok), self.errors(scored, mutants), measured, in_train]
        return pa.table(columns, schema=output_schema(names))


def read_state(exp_dir: Path) -> dict:
    path = Path(exp_dir) / PREDICT_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"{path} is missing: the experiment was trained before infra saved what prediction needs; "
            "train it again ('infra run PLAN --rerun') to predict with it"
        ) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not readable JSON ({exc}); train the experiment again") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not state.get("sources"):
        raise DataError(f"{path}: not a prediction state of format {STATE_FORMAT}; train the experiment again")
    check_state_lengths(state, path)
    return state


def check_state_lengths(state: dict, path) -> None:
    """Refuse a prediction state whose templates or sequence length exceed `PREDICT_MAX_TEMPLATE`, or
    are not what the training writes (the file is the training's output: plugin code can rewrite it,
    and a template's length multiplies every output row and a saturation's row count)."""
    sources, seq_len = state.get("sources"), state.get("seq_len")
    fine = isinstance(sources, list) and all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("template"), str) for s in sources
    )
    if not fine or not isinstance(seq_len, int) or isinstance(seq_len, bool):
        raise DataError(f"{path}: not a prediction state (sources or seq_len malformed); train the experiment again")
    longest = max([seq_len, *(len(s["template"]) for s in sources)])
    if longest > PREDICT_MAX_TEMPLATE or seq_len < 1:
        raise DataError(
            f"{path}: a template or seq_len of {longest:,} residues is outside 1..{PREDICT_MAX_TEMPLATE:,}; "
            "the file was altered or is damaged: train the experiment again"
        )


def load_predictor(exp_dir: Path, checkpoint: Path, workdir: Path | None = None, source: str | None = None):
    """The experiment's model from `checkpoint`, rebuilt from its hyper-parameters with the plugins in
    `workdir`, and the template of `source` (optional when the training saw one source)."""
    import torch

    from runner.core.plugins import load_plugins
    from runner.core.training import VariantModule
    from runner.core.transforms import TargetTransform
    from runner.core.vocab import get_vocab_processor

    state = read_state(exp_dir)
    names = [s["name"] for s in state["sources"]]
    if source is None and len(names) > 1:
        raise DataError(
            f"the experiment was trained on {len(names)} sources; pick one with --source ({', '.join(names)})"
        )
    if source is not None and source not in names:
        raise DataError(f"--source {source!r} is not one of the experiment's sources: {', '.join(names)}")
    template = state["sources"][names.index(source) if source is not None else 0]["template"]
    if workdir is not None:
        load_plugins(workdir)
    try:
        # weights_only: tensors and plain containers, never arbitrary pickled objects (the file is the
        # training's output, i.e. plugin code's); Lightning checkpoints of infra's modules load this way
        ckpt = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
        hparams, weights = dict(ckpt["hyper_parameters"]), ckpt["state_dict"]
    except (OSError, KeyError, TypeError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DataError(f"{checkpoint}: not a usable checkpoint ({type(exc).__name__}: {exc})") from None
    module = VariantModule(**hparams)
    module.load_state_dict(weights)
    module.eval()
    if torch.cuda.is_available():
        module.to("cuda")
    vocab = get_vocab_processor(state["vocab"]["name"], **(state["vocab"].get("params") or {}))
    if _prepared_embedding(module) is not None:
        _prepare_known(module, Path(exp_dir), state, vocab)
    spec = state["transform"]
    transform = TargetTransform(spec["name"])
    transform.params = {k: float(v) for k, v in spec.items() if k not in ("name", "sorted_file")}
    if spec["name"] == "rank":
        transform._sorted = np.load(Path(exp_dir) / TARGET_SORTED, allow_pickle=False)
    known = KnownVariants.load(Path(exp_dir), source if source is not None else names[0])
    return Predictor(module, vocab, template, state["seq_len"], transform, state["task"], known)


def _covariate_embedding(module):
    """The module's data.covariates wrapper around its embedding (runner.core.covariates), or None."""
    from runner.core.covariates import CovariateEmbedding

    return module.embed if isinstance(module.embed, CovariateEmbedding) else None


def _prepared_embedding(module):
    """The module's `plm` embedding (features computed once, cached), also inside a covariates wrapper, or None."""
    from runner.core.plm import PLMEmbedding

    wrapper = _covariate_embedding(module)
    embed = wrapper.inner if wrapper is not None else module.embed
    return embed if isinstance(embed, PLMEmbedding) else None


def _prepare_known(module, exp_dir: Path, state: dict, vocab: BaseVocabProcessor) -> None:
    """Give the `plm` embedding the training's sequences (data/selected.parquet, in the training's
    order, so the cache key is the training's): their features come from the embedding cache, and a
    predicted mutant the training saw is looked up, not computed. Nothing is computed here: without
    a cache entry, rows are computed as they come."""
    import pyarrow.parquet as pq

    path = exp_dir / "data/selected.parquet"
    try:
        table = pq.read_table(path, columns=["sequence", "source_text"])
    except (OSError, pa.ArrowException, KeyError) as exc:
        log.info("plm: no training sequences to look up (%s: %s)", path, exc)
        return
    names = [s["name"] for s in state["sources"]]
    source_text = table.column("source_text").to_pandas().astype(str)
    source = source_text.map({n: i for i, n in enumerate(names)})
    if source.isna().any():
        log.info("plm: %s names a source the prediction state lacks; the training's features are not used", path)
        return
    tokens = vocab.encode(table.column("sequence").to_pylist(), length=int(state["seq_len"]))
    templates = [s["template"] for s in state["sources"]]
    embed = _prepared_embedding(module)
    if embed.prepare(tokens, templates, source.to_numpy(np.int64), compute=False):
        log.info("plm: the training's %d sequences read from the embedding cache", len(tokens))
    else:
        log.info("plm: the training's features are not in the embedding cache; every row is computed")


# --- input ----------------------------------------------------------------------------------------


def mutant_text(mutants: pa.Array) -> MutantText:
    """An Arrow string array as the parser's newline-joined buffer, without a Python string per row.

    A line break inside a (quoted) mutant becomes '?', so that row is reported malformed rather than
    splitting into two. Whitespace around a mutant is dropped, as the importer does.
    """
    mutants = mutants.cast(pa.large_string())
    n = len(mutants)
    if mutants.null_count:
        mutants = pc.fill_null(mutants, "?")
    mutants = pc.utf8_trim_whitespace(mutants)
    offsets = np.frombuffer(mutants.buffers()[1], dtype=np.int64)[mutants.offset : mutants.offset + n + 1]
    data = np.frombuffer(mutants.buffers()[2], dtype=np.uint8) if n else np.zeros(0, np.uint8)
    letters = data[offsets[0] : offsets[-1]]
    buf = np.empty(letters.size + n, dtype=np.uint8)
    row_end = offsets[1:] - offsets[0] + np.arange(n)
    is_end = np.zeros(buf.size, dtype=bool)
    is_end[row_end] = True
    buf[is_end] = ord("\n")
    buf[~is_end] = np.where(letters == ord("\n"), np.uint8(ord("?")), letters)
    return MutantText(buf, n)


def _delimiter(path: Path, header: str) -> str:
    from runner.data.tables import sniff_delimiter  # the host reads the same input the same way

    return sniff_delimiter(header, path.name)


def read_mutants(
    path: Path, chunk_rows: int = CHUNK_ROWS, covariates: list[str] | tuple[str, ...] = ()
) -> Iterator[pa.Table]:
    """A CSV/TSV (optionally .gz) in tables of at most `chunk_rows` rows: every column as text,
    exactly as in the file (the `mutant` column first, then the others in the file's order, each
    under its output name: `output_column_names`). With `covariates` (the training's
    data.covariates) their values must be present and finite numbers in every row (missing values
    are refused, as in training)."""
    import pyarrow.csv as pacsv

    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            head = stream.read(1 << 16).decode("utf-8", "replace")
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    sep = _delimiter(path, header)
    read = pacsv.ReadOptions(block_size=1 << 22)
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True)
    try:
        # the column names as Arrow reads them (quotes, BOM): a first reader only for its schema
        columns = pacsv.open_csv(pa.input_stream(str(path), compression="detect"), read, parse).schema.names
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable CSV/TSV ({exc})") from None
    if "mutant" not in columns:
        raise DataError(
            f"{path}: no 'mutant' column (columns: {', '.join(columns[:20]) or 'none'}); "
            "give one mutant per row, e.g. A23G:L45P ('' for the wild type)"
        )
    absent = [c for c in covariates if c not in columns]
    if absent:
        raise DataError(
            f"{path}: no column {', '.join(map(repr, absent))}: the experiment was trained with data.covariates "
            f"({', '.join(covariates)}); give each mutant's values as columns of the input file"
        )
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(
            f"{path}: column {', '.join(map(repr, twice))} appears more than once; give each a distinct name"
        )
    others = [c for c in columns if c != "mutant"]
    try:
        names = output_column_names(others)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    row = 0
    try:
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=read,
            parse_options=parse,
            convert_options=pacsv.ConvertOptions(
                column_types=dict.fromkeys(columns, pa.large_string()), strings_can_be_null=False
            ),
        )
        for batch in reader:
            table = pa.Table.from_batches([batch]).select(["mutant", *others]).rename_columns(["mutant", *names])
            if covariates:
                _check_covariates(path, table, [names[others.index(c)] for c in covariates], covariates, row)
            row += batch.num_rows
            for start in range(0, len(table), chunk_rows):
                yield table.slice(start, chunk_rows)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable CSV/TSV ({exc})") from None


def covariate_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A text column of covariate values as float64 (NaN where missing: empty, NA, NaN… as Arrow's
    CSV reader reads them). ValueError naming the first value that is not a number."""
    import pyarrow.csv as pacsv

    text = pc.utf8_trim_whitespace(column)
    missing = pc.is_in(text, value_set=pa.array(pacsv.ConvertOptions().null_values, pa.large_string()))
    text = pc.if_else(missing, "nan", text)
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        for value in text.to_pylist():  # the error path only: find the value to name
            try:
                float(value)
            except ValueError:
                raise ValueError(f"value {value!r} is not a number") from None
        raise


def _check_covariates(path: Path, table: pa.Table, columns: list[str], covariates, row: int) -> None:
    """Every covariate of every input row present and finite: prediction imputes nothing, as training."""
    for name, given in zip(columns, covariates, strict=True):
        try:
            values = covariate_values(table.column(name))
        except ValueError as exc:
            raise DataError(f"{path}: column {given!r}: {exc}; covariates are numbers") from None
        missing = ~np.isfinite(values)
        if missing.any():
            first = row + int(np.flatnonzero(missing)[0]) + 2  # the file's line: 1-based, after the header
            raise DataError(
                f"{path}: column {given!r} is missing (empty, NaN or infinite) in {int(missing.sum())} row(s) "
                f"(first on line {first}); every mutant needs its covariates: fill them in or leave those rows out"
            )


def chunk_parts(
    chunk: pa.Array | pa.Table, covariates: list[str]
) -> tuple[pa.Array, np.ndarray | None, pa.Table | None]:
    """A chunk of input as (mutants, covariate values N × K in `covariates`' order or None, the
    other input columns as a table or None). A covariate is found under its output name."""
    if not isinstance(chunk, pa.Table | pa.RecordBatch):
        return chunk, None, None
    mutants = chunk.column("mutant")
    mutants = mutants.combine_chunks() if isinstance(mutants, pa.ChunkedArray) else mutants
    inputs = chunk.select([i for i, name in enumerate(chunk.column_names) if name != "mutant"])
    if isinstance(inputs, pa.RecordBatch):
        inputs = pa.Table.from_batches([inputs])
    if not covariates:
        return mutants, None, inputs
    names = output_column_names(covariates)
    values = [covariate_values(chunk.column(c)) for c in names]
    return mutants, np.stack(values, axis=1).astype(np.float64), inputs


def saturation_mutants(template: str, vocab: BaseVocabProcessor) -> pa.Array:
    """Every single substitution of the template: each position to each standard amino acid the vocab
    encodes (the vocab's letters when it has none of them), the wild type excluded: 19 × L for IUPAC."""
    residues = [a for a in IUPAC_AMINO_ACIDS if vocab.lookup[ord(a)] != 255]
    if not residues:
        residues = [a for a in vocab.alphabet if a.isalpha()]
    out = [f"{wt}{pos}{aa}" for pos, wt in enumerate(template, start=1) for aa in residues if aa != wt.upper()]
    return pa.array(out, pa.large_string())


# --- output ---------------------------------------------------------------------------------------


class TopN:
    """The N highest predictions seen so far (ties: the earlier row first), merged chunk by chunk."""

    def __init__(self, n: int, schema: pa.Schema = OUTPUT_SCHEMA):
        self.n, self.schema = n, schema
        self.best: pa.Table | None = None

    def add(self, table: pa.Table) -> None:
        rows = table.filter(pc.is_valid(table.column("prediction")))
        if self.best is not None:
            rows = pa.concat_tables([self.best, rows])
        if len(rows) > self.n:
            pred = rows.column("prediction").to_numpy()
            order = np.argsort(-pred, kind="stable")[: self.n]
            rows = rows.take(pa.array(np.sort(order)))
        self.best = rows

    def result(self) -> pa.Table:
        if self.best is None or len(self.best) == 0:
            return self.schema.empty_table()
        order = np.argsort(-self.best.column("prediction").to_numpy(), kind="stable")
        return self.best.take(pa.array(order))


class Sink:
    """Rows written to `<out>.<random>.tmp` beside `out`; `commit` renames it into place."""

    def __init__(self, out: Path, fmt: str, schema: pa.Schema = OUTPUT_SCHEMA):
        import secrets

        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        self.out = out
        self.tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        self.writer = (
            pq.ParquetWriter(str(self.tmp), schema) if fmt == "parquet" else pacsv.CSVWriter(str(self.tmp), schema)
        )

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.out)

    def discard(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def predict_to_file(
    predictor: Predictor, chunks: Iterator[pa.Array | pa.Table], out: Path, fmt: str = "csv", top: int | None = None
) -> dict:
    """Score every chunk and write the rows (or the `top` best) to `out` atomically; the summary.

    A chunk is the mutants (an Arrow string array) or a table of `mutant` and the input's other
    columns as text (`read_mutants`); every chunk has the same columns.
    """
    started = time.perf_counter()
    sink: Sink | None = None
    keep_top: TopN | None = None
    schema = OUTPUT_SCHEMA
    rows = errors = measured = in_train = 0
    by_reason = dict.fromkeys(REASONS, 0)
    try:
        for chunk in chunks:
            mutants, covariates, inputs = chunk_parts(chunk, predictor.covariates)
            scored = predictor.score(mutant_text(mutants), covariates)
            table = predictor.table(mutants, scored, inputs)
            if sink is None:  # the header is the first chunk's columns
                schema = table.schema
                sink = Sink(out, fmt, schema)
                keep_top = TopN(top, schema) if top else None
            rows += len(table)
            counts = np.bincount(scored.reason, minlength=len(REASONS) + 1)
            errors += int(counts[1:].sum())
            for reason, count in zip(REASONS, counts[1:], strict=True):
                by_reason[reason] += int(count)
            measured += pc.sum(table.column("measured")).as_py() or 0  # a bool sum counts the trues
            in_train += pc.sum(table.column("in_train")).as_py() or 0
            if keep_top is not None:
                keep_top.add(table)
            else:
                sink.write(table)
        if rows == 0:
            raise DataError("the input has no rows to predict; give one mutant per row")
        if keep_top is not None:
            sink.write(keep_top.result())
        sink.commit()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    return {
        "rows": rows,
        "predicted": rows - errors,
        "errors": errors,
        "errors_by_reason": {k: v for k, v in by_reason.items() if v},
        "written": min(top, rows - errors) if top else rows,
        "out": str(out),
        "format": fmt,
        "seconds": round(time.perf_counter() - started, 3),
        "columns": schema.names,
        # null: the experiment lacks the files to tell (trained before infra wrote them)
        "measured": int(measured) if predictor.known.measured is not None else None,
        "in_train": int(in_train) if predictor.known.train is not None else None,
    }


# --- entry point ----------------------------------------------------------------------------------


def predict_member(args, exp_dir: Path, checkpoint: Path, out: Path) -> dict:
    """One experiment's prediction of the request in `args` (input or saturation, format, top, source)
    into `out`; its summary."""
    predictor = load_predictor(exp_dir, checkpoint, args.workdir, args.source)
    if args.saturation and predictor.covariates:
        raise DataError(
            f"--saturation: the experiment was trained with data.covariates ({', '.join(predictor.covariates)}), "
            "which a generated mutant has no values of; give the mutants and their covariates in an input file"
        )
    chunks = (
        iter([saturation_mutants(predictor.template, predictor.vocab)])
        if args.saturation
        else read_mutants(args.input, covariates=predictor.covariates)
    )
    return predict_to_file(predictor, chunks, out, args.format, args.top)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runner.core.predict",
        description="Score mutants with an experiment's trained model (what 'infra predict' runs).",
    )
    parser.add_argument("--exp-dir", type=Path, help="experiment directory (config/ is read)")
    parser.add_argument("--checkpoint", type=Path, help="the checkpoint to load")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CSV/TSV with a 'mutant' column")
    source.add_argument("--saturation", action="store_true", help="every single substitution of the template")
    parser.add_argument("--out", type=Path, help="output file (written atomically)")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--top", type=int, default=None, help="keep only the N best predictions")
    parser.add_argument("--source", default=None, help="which template when the training had several")
    parser.add_argument("--summary", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument("--workdir", type=Path, default=None, help="workdir with the plugin folders")
    parser.add_argument(
        "--member",
        nargs=4,
        action="append",
        type=Path,
        metavar=("EXP_DIR", "CHECKPOINT", "OUT", "SUMMARY"),
        help="instead of --exp-dir/--checkpoint/--out/--summary, and repeatable: one experiment of an "
        "ensemble, all predicted in this one process in order (the input is read once per member)",
    )
    return parser


def _members(args, parser) -> list[tuple[Path, Path, Path, Path | None]]:
    """(exp_dir, checkpoint, out, summary) of each experiment to predict: the --member quadruples, or
    the one experiment of --exp-dir/--checkpoint/--out[/--summary]."""
    single = (args.exp_dir, args.checkpoint, args.out)
    if args.member:
        if any(v is not None for v in (*single, args.summary)):
            parser.error("--member replaces --exp-dir, --checkpoint, --out and --summary: give one or the other")
        return [tuple(m) for m in args.member]
    if any(v is None for v in single):
        parser.error("give --exp-dir, --checkpoint and --out (or --member, once per experiment)")
    return [(*single, args.summary)]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    members = _members(args, parser)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # per-row problems are the output's `error` column, not a warning per chunk
    logging.getLogger("runner.core.variants").setLevel(logging.ERROR)
    try:
        if args.top is not None and args.top < 1:
            raise DataError(f"--top {args.top}: must be a positive number of rows")
        from runner.core.cli import _set_threads

        _set_threads()  # resources.cpus, as the training: INFRA_THREADS
        # Members run in order and the first failure ends the process: the caller (infra predict) tells
        # which member failed by the first summary missing, and the ensemble fails as a whole.
        for exp_dir, checkpoint, out, summary_file in members:
            summary = predict_member(args, exp_dir, checkpoint, out)
            if summary_file is not None:
                summary_file.write_text(json.dumps(summary) + "\n", encoding="utf-8")
            print(json.dumps(summary), flush=True)
        if len(members) == 1 and summary["predicted"] == 0:  # an ensemble's members are judged together
            print(
                f"infra-predict: error: none of the {summary['rows']} rows could be predicted; see the error column of {out}",
                file=sys.stderr,
            )
            return 2
        return 0
    except InfraError as exc:
        print(f"infra-predict: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        import traceback

        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
