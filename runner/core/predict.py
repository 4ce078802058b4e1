"""`python -m runner.core.predict`: score mutants of an experiment's template with its trained model.

What `infra predict` runs inside the experiment's own image (or as a host process with `--backend
local`). The model is rebuilt from the checkpoint's saved hyper-parameters with the experiment's
plugins; the template, vocabulary and target transform come from `config/predict.json`, which the
training writes (`save_predict_state`), so no database is needed at predict time.

The data path is the training's: mutants stay one byte buffer (`runner.core.variants`), are parsed
and scattered into a uint8 token matrix without a per-row Python loop, and are scored in bounded
chunks under `torch.inference_mode`. A row the model cannot take (bad syntax, a position outside
the template, a wild-type letter that does not match, a residue the vocabulary lacks) is kept in
the output with an `error` and no prediction. Rows stream to a temporary file renamed into place
at the end; `--top N` keeps only the N best, merged chunk by chunk.

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

from runner.core.variants import REASONS, MutantText, apply_mutants
from runner.core.vocab import IUPAC_AMINO_ACIDS, BaseVocabProcessor
from runner.errors import DataError, InfraError
from runner.plan.models import Plan
from runner.run.jobs import PREDICT_MAX_TEMPLATE

log = logging.getLogger(__name__)

PREDICT_STATE = "config/predict.json"
TARGET_SORTED = "config/target_sorted.npy"  # the rank transform's training targets (its inverse needs them)
STATE_FORMAT = 1
CHUNK_ROWS = 1 << 16  # variants parsed and encoded at a time: 20 MB of tokens at length 300
SCORE_BATCH = 8192  # rows per model call, as in the training's own predictions
OUTPUT_SCHEMA = pa.schema(
    [("mutant", pa.large_string()), ("sequence", pa.large_string()), ("prediction", pa.float64()),
     ("error", pa.string())]
)  # fmt: skip


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


ERROR_TEXT = {
    "malformed": "malformed mutant: expected <wild type><1-based position><new residue>[:...], e.g. A23G:L45P",
    "out_of_range": "position outside the template (1..{length})",
    "mismatch": "wild-type residue does not match the template at that position",
    "unknown_residue": "new residue not in vocab {vocab}",
}


@dataclass
class Scored:
    """One chunk's outcome, row-aligned with its input."""

    prediction: np.ndarray  # float64 per input row (NaN where the row has an error)
    reason: np.ndarray  # int8 per input row: 0 fine, else 1 + index into REASONS
    tokens: np.ndarray  # uint8 N_kept × L of the rows without an error


class Predictor:
    """A trained experiment ready to score mutants of one template."""

    def __init__(self, module, vocab: BaseVocabProcessor, template: str, seq_len: int, transform, task: str):
        import torch

        self.module, self.vocab, self.template = module, vocab, template
        self.seq_len, self.transform, self.task = int(seq_len), transform, task
        # buffers too: a closed-form model (ridge) has no parameters, only buffers
        self.device = next(itertools.chain(module.parameters(), module.buffers()), torch.zeros(0)).device
        self.errors = pa.array(
            [None, *(ERROR_TEXT[r].format(length=len(template), vocab=vocab.name) for r in REASONS)], pa.string()
        )
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
        result = apply_mutants([self.template], np.zeros(n, np.int64), mutants, self.vocab, on_mismatch="drop")
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
        return Scored(prediction, result.reason, tokens)

    def sequences(self, tokens: np.ndarray) -> pa.Array:
        """The template-length sequences of a token matrix as an Arrow string array (no per-row loop)."""
        width = len(self.template)
        letters = np.ascontiguousarray(self.vocab.inverse[tokens[:, :width]])
        offsets = np.arange(len(tokens) + 1, dtype=np.int64) * width
        return pa.LargeStringArray.from_buffers(len(tokens), pa.py_buffer(offsets), pa.py_buffer(letters))

    def table(self, mutants: pa.Array, scored: Scored) -> pa.Table:
        """The output rows of a chunk: mutant, sequence, prediction, error (nulls where they do not apply)."""
        ok = scored.reason == 0
        kept_index = np.cumsum(ok) - 1
        sequence = self.sequences(scored.tokens).take(pa.array(kept_index, mask=~ok))
        return pa.table(
            [
                mutants.cast(pa.large_string()),
                sequence,
                pa.array(scored.prediction, mask=~ok),
                self.errors.take(pa.array(scored.reason)),
            ],
            schema=OUTPUT_SCHEMA,
        )


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
    return Predictor(module, vocab, template, state["seq_len"], transform, state["task"])


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
    splitting into two.
    """
    mutants = mutants.cast(pa.large_string())
    n = len(mutants)
    if mutants.null_count:
        mutants = pc.fill_null(mutants, "?")
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
    name = path.name.lower().removesuffix(".gz")
    if name.endswith((".tsv", ".tab")):
        return "\t"
    return "\t" if "\t" in header and "," not in header else ","


def read_mutants(
    path: Path, chunk_rows: int = CHUNK_ROWS, covariates: list[str] | tuple[str, ...] = ()
) -> Iterator[pa.Array | pa.Table]:
    """The `mutant` column of a CSV/TSV (optionally .gz) in chunks of at most `chunk_rows` rows; with
    `covariates` (the training's data.covariates), tables of `mutant` and those columns as float64,
    every value present and finite (missing values are refused, as in training)."""
    import pyarrow.csv as pacsv

    try:
        with pa.input_stream(str(path), compression="detect") as stream:
            head = stream.read(1 << 16).decode("utf-8", "replace")
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    header = head.lstrip("\ufeff").splitlines()[0] if head.strip() else ""
    sep = _delimiter(path, header)
    columns = [c.strip().strip('"') for c in header.split(sep)]
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
    types = {"mutant": pa.large_string(), **dict.fromkeys(covariates, pa.float64())}
    row = 0
    try:
        reader = pacsv.open_csv(
            pa.input_stream(str(path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=1 << 22),
            parse_options=pacsv.ParseOptions(delimiter=sep, newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=["mutant", *covariates], column_types=types, strings_can_be_null=False
            ),
        )
        for batch in reader:
            if covariates:
                _check_covariates(path, batch, covariates, row)
            row += batch.num_rows
            part = pa.Table.from_batches([batch]) if covariates else batch.column(0)
            for start in range(0, len(part), chunk_rows):
                yield part.slice(start, chunk_rows)
    except pa.ArrowException as exc:
        raise DataError(f"{path}: not a readable CSV/TSV ({exc})") from None


def _check_covariates(path: Path, batch: pa.RecordBatch, covariates, row: int) -> None:
    """Every covariate of every input row present and finite: prediction imputes nothing, as training."""
    for name in covariates:
        values = batch.column(name).to_numpy(zero_copy_only=False)  # float64; a null reads as NaN
        missing = ~np.isfinite(values)
        if missing.any():
            first = row + int(np.flatnonzero(missing)[0]) + 2  # the file's line: 1-based, after the header
            raise DataError(
                f"{path}: column {name!r} is missing (empty, NaN or infinite) in {int(missing.sum())} row(s) "
                f"(first on line {first}); every mutant needs its covariates: fill them in or leave those rows out"
            )


def chunk_parts(chunk: pa.Array | pa.Table, covariates: list[str]) -> tuple[pa.Array, np.ndarray | None]:
    """A chunk of input as (mutants, covariate values N × K in `covariates`' order, or None)."""
    if isinstance(chunk, pa.Table | pa.RecordBatch):
        mutants = chunk.column("mutant")
        mutants = mutants.combine_chunks() if isinstance(mutants, pa.ChunkedArray) else mutants
        if not covariates:
            return mutants, None
        values = [chunk.column(c).to_numpy() for c in covariates]
        return mutants, np.stack(values, axis=1).astype(np.float64)
    return chunk, None


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

    def __init__(self, n: int):
        self.n = n
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
            return OUTPUT_SCHEMA.empty_table()
        order = np.argsort(-self.best.column("prediction").to_numpy(), kind="stable")
        return self.best.take(pa.array(order))


class Sink:
    """Rows written to `<out>.<random>.tmp` beside `out`; `commit` renames it into place."""

    def __init__(self, out: Path, fmt: str):
        import secrets

        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        self.out = out
        self.tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
        self.writer = (
            pq.ParquetWriter(str(self.tmp), OUTPUT_SCHEMA)
            if fmt == "parquet"
            else pacsv.CSVWriter(str(self.tmp), OUTPUT_SCHEMA)
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
    predictor: Predictor, chunks: Iterator[pa.Array], out: Path, fmt: str = "csv", top: int | None = None
) -> dict:
    """Score every chunk and write the rows (or the `top` best) to `out` atomically; the summary."""
    started = time.perf_counter()
    sink = Sink(out, fmt)
    keep_top = TopN(top) if top else None
    rows = errors = 0
    by_reason = dict.fromkeys(REASONS, 0)
    try:
        for chunk in chunks:
            mutants, covariates = chunk_parts(chunk, predictor.covariates)
            scored = predictor.score(mutant_text(mutants), covariates)
            table = predictor.table(mutants, scored)
            rows += len(table)
            counts = np.bincount(scored.reason, minlength=len(REASONS) + 1)
            errors += int(counts[1:].sum())
            for reason, count in zip(REASONS, counts[1:], strict=True):
                by_reason[reason] += int(count)
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
    }


# --- entry point ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m runner.core.predict",
        description="Score mutants with an experiment's trained model (what 'infra predict' runs).",
    )
    parser.add_argument("--exp-dir", required=True, type=Path, help="experiment directory (config/ is read)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint to load")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", type=Path, help="CSV/TSV with a 'mutant' column")
    source.add_argument("--saturation", action="store_true", help="every single substitution of the template")
    parser.add_argument("--out", required=True, type=Path, help="output file (written atomically)")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv")
    parser.add_argument("--top", type=int, default=None, help="keep only the N best predictions")
    parser.add_argument("--source", default=None, help="which template when the training had several")
    parser.add_argument("--summary", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument("--workdir", type=Path, default=None, help="workdir with the plugin folders")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    # per-row problems are the output's `error` column, not a warning per chunk
    logging.getLogger("runner.core.variants").setLevel(logging.ERROR)
    try:
        if args.top is not None and args.top < 1:
            raise DataError(f"--top {args.top}: must be a positive number of rows")
        from runner.core.cli import _set_threads

        _set_threads()  # resources.cpus, as the training: INFRA_THREADS
        predictor = load_predictor(args.exp_dir, args.checkpoint, args.workdir, args.source)
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
        summary = predict_to_file(predictor, chunks, args.out, args.format, args.top)
        if args.summary is not None:
            args.summary.write_text(json.dumps(summary) + "\n", encoding="utf-8")
        print(json.dumps(summary), flush=True)
        if summary["predicted"] == 0:
            print(
                f"infra-predict: error: none of the {summary['rows']} rows could be predicted; see the error column of {args.out}",
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
