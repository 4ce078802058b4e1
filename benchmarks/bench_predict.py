"""`infra predict`'s input path vs a bare model loop: parse + encode + score against `model(batch)`.

A synthetic 300-aa template and N variants of 1–3 random substitutions (as an Arrow string column,
what the CSV reader yields). The model is a real trained one: a short training of the built-in
model on a slice of the variants with made-up scores, the module rebuilt from its checkpoint
exactly as `infra predict` does (`runner.core.predict.load_predictor`).

- bare: the variants pre-encoded once (outside the timing), then `module(batch)` under
  `torch.inference_mode` over the token matrix in batches of the predictor's size;
- predict: `Predictor.score(mutant_text(chunk))` over the same variants in the predictor's chunks:
  parse the mutant strings, check them against the template, encode, score, invert the transform.

Prints both rates, their ratio (target ≥ 0.8: the input path adds little), the end-to-end rate of
`predict_to_file` into a CSV with sequences, and the peak RSS.

Usage: nice python benchmarks/bench_predict.py [--n 1000000] [--length 300] [--model linear] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from runner.core.vocab import IUPAC_AMINO_ACIDS  # noqa: E402


def make_variants(n: int, length: int, seed: int = 0) -> tuple[str, pa.Array]:
    """A random template and n mutant strings of 1–3 substitutions at distinct positions."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(IUPAC_AMINO_ACIDS.encode(), dtype=np.uint8)
    template = bytes(letters[rng.integers(0, 20, length)]).decode()
    k = rng.integers(1, 4, n)
    pieces = []
    first = rng.integers(0, length, n)
    # distinct positions: offsets from the first one in disjoint ranges
    offsets = [0, rng.integers(1, length // 2, n), rng.integers(length // 2, length, n)]
    for j in range(3):
        pos = (first + offsets[j]) % length
        wt = np.frombuffer(template.encode(), np.uint8)[pos]
        mt = letters[(np.searchsorted(letters, wt) + rng.integers(1, 20, n)) % 20]  # never the wild type
        text = np.char.add(np.char.add(wt.view("S1").astype(str), (pos + 1).astype(str)), mt.view("S1").astype(str))
        pieces.append(np.where(j < k, text, ""))
    joined = pieces[0]
    for j in (1, 2):
        joined = np.where(pieces[j] != "", np.char.add(np.char.add(joined, ":"), pieces[j]), joined)
    return template, pa.array(joined.tolist(), pa.large_string())


def train_experiment(root: Path, template: str, mutants: pa.Array, model: str) -> Path:
    """A real experiment: the core trains `model` briefly on 4,000 variants with random scores."""
    import sqlite3

    from runner.core.experiment import run_experiment
    from runner.data.db import SCHEMA_SQL
    from runner.plan.models import Plan

    db = root / "bench.db"
    conn = sqlite3.connect(db)
    conn.executescript(SCHEMA_SQL)
    conn.execute("INSERT INTO sources(id, source_text, template) VALUES (1, 'synthetic', ?)", (template,))
    rng = np.random.default_rng(1)
    rows = mutants.slice(0, 4000).to_pylist()
    conn.executemany(
        "INSERT INTO mutations(id, source, mutant, mut_num, DMS_score) VALUES (?, 1, ?, ?, ?)",
        [
            (i + 1, m, m.count(":") + 1, float(s))
            for i, (m, s) in enumerate(zip(rows, rng.normal(size=len(rows)), strict=True))
        ],
    )
    conn.commit()
    conn.close()
    exp = root / "exp"
    plan = {"name": "bench", "data": {"db": str(db)}, "model": {"name": model}, "train": {"max_epochs": 1}}
    run_experiment(Plan.model_validate(plan), exp)
    return exp


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--length", type=int, default=300)
    parser.add_argument("--model", default="linear")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from runner.core.predict import CHUNK_ROWS, SCORE_BATCH, load_predictor, mutant_text, predict_to_file
    from runner.core.variants import apply_mutants

    template, mutants = make_variants(args.n, args.length)
    with tempfile.TemporaryDirectory() as tmp:
        exp = train_experiment(Path(tmp), template, mutants, args.model)
        ckpt = exp / "ckpts" / ("best.ckpt" if (exp / "ckpts" / "best.ckpt").exists() else "last.ckpt")
        predictor = load_predictor(exp, ckpt)
        module = predictor.module

        tokens = apply_mutants(
            [template], np.zeros(len(mutants), np.int64), mutant_text(mutants), predictor.vocab
        ).tokens
        # The two paths take turns chunk by chunk (which goes first alternates), so load from other
        # processes on a shared machine falls on both alike.
        bare_s = predict_s = 0.0
        n_pred = 0
        for i, start in enumerate(range(0, len(mutants), CHUNK_ROWS)):
            for path in ("bare", "predict") if i % 2 == 0 else ("predict", "bare"):
                t0 = time.perf_counter()
                if path == "bare":
                    chunk = tokens[start : start + CHUNK_ROWS]
                    with torch.inference_mode():
                        for b in range(0, len(chunk), SCORE_BATCH):
                            module(torch.from_numpy(chunk[b : b + SCORE_BATCH]))
                    bare_s += time.perf_counter() - t0
                else:
                    scored = predictor.score(mutant_text(mutants.slice(start, CHUNK_ROWS)))
                    n_pred += int(np.isfinite(scored.prediction).sum())
                    predict_s += time.perf_counter() - t0
        rss_after_scoring = rss_mib()
        del tokens
        assert n_pred == len(mutants), f"{len(mutants) - n_pred} variants were not predicted"

        out = Path(tmp) / "out.csv"
        chunks = (mutants.slice(s, CHUNK_ROWS) for s in range(0, len(mutants), CHUNK_ROWS))
        t0 = time.perf_counter()
        summary = predict_to_file(predictor, chunks, out)
        file_s = time.perf_counter() - t0
        out_mb = out.stat().st_size / 1e6

    result = {
        "n": len(mutants),
        "length": args.length,
        "model": args.model,
        "torch_threads": torch.get_num_threads(),
        "bare_model_per_s": round(len(mutants) / bare_s),
        "predict_per_s": round(len(mutants) / predict_s),
        "ratio": round(bare_s / predict_s, 3),
        "to_csv_per_s": round(len(mutants) / file_s),
        "csv_mb": round(out_mb, 1),
        "rows_written": summary["rows"],
        "peak_rss_mib": round(rss_mib()),
        "rss_after_scoring_mib": round(rss_after_scoring),
    }
    print(
        f"bare model(batch): {result['bare_model_per_s']:,} variants/s; parse+encode+score: "
        f"{result['predict_per_s']:,} variants/s; ratio {result['ratio']} (target >= 0.8)\n"
        f"to a CSV with sequences: {result['to_csv_per_s']:,} variants/s ({result['csv_mb']} MB); "
        f"peak RSS {result['peak_rss_mib']} MiB",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
