"""Benchmark of the data path: SQLite read, mutate + encode, and end-to-end `load_variants`.

Builds (or reuses) a synthetic database of N variants (default 1,000,000) on one random template
(default 300 aa) with 1-4 substitutions each, then measures each stage in a fresh subprocess (so
peak memory is the stage's own) beside a naive per-row reference implementation run on a
subsample, and prints variants/s, the speed-up and peak RSS.

Targets (DESIGN §8 / issue 3): mutate + encode >= 1,000,000 variants/s; end to end >= 300,000
variants/s and >= 20x the naive path.

Usage: python benchmarks/bench_data.py [--n 1000000] [--length 300] [--naive-n 20000] [--db PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.core.data import _read_columns as read_columns  # noqa: E402
from runner.core.data import _read_columns_arrow as read_columns_arrow  # noqa: E402
from runner.core.data import build_query, load_variants, read_parts  # noqa: E402
from runner.core.variants import apply_mutants  # noqa: E402
from runner.core.vocab import IUPAC_AMINO_ACIDS, get_vocab_processor  # noqa: E402
from runner.data.db import SCHEMA_SQL, connect_readonly, read_layout  # noqa: E402
from runner.plan.models import DataSpec  # noqa: E402

SOURCE = "SYNTH"


def make_db(path: Path, n: int, length: int, seed: int = 0) -> None:
    """Write a synthetic database: one template, n variants with 1-4 distinct substitutions each."""
    rng = np.random.default_rng(seed)
    aa = np.frombuffer(IUPAC_AMINO_ACIDS.encode(), dtype=np.uint8)
    template_idx = rng.integers(0, 20, length)
    template = aa[template_idx].tobytes().decode()
    k = rng.integers(1, 5, n)
    base = rng.integers(0, length, n)
    stride = rng.integers(1, length // 4, n)
    pieces = []
    for slot in range(4):
        pos0 = (base + slot * stride) % length  # distinct per row: stride < length / 4
        wt = aa[template_idx[pos0]]
        mt = aa[(template_idx[pos0] + rng.integers(1, 20, n)) % 20]
        text = np.char.add(np.char.add(wt.view("S1"), (pos0 + 1).astype("S")), mt.view("S1"))
        pieces.append(np.where(slot < k, text, b""))
    mutant = pieces[0]
    for slot in range(1, 4):
        mutant = np.where(slot < k, np.char.add(np.char.add(mutant, b":"), pieces[slot]), mutant)
    mutants = np.char.decode(mutant, "ascii").tolist()
    score = rng.normal(size=n) - 0.3 * k
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA_SQL)
    conn.execute("INSERT INTO sources (source_text, template) VALUES (?, ?)", (SOURCE, template))
    conn.executemany(
        "INSERT INTO mutations (source, mutant, mut_num, DMS_score, DMS_score_bin) VALUES (1, ?, ?, ?, ?)",
        zip(mutants, k.tolist(), score.tolist(), (score > 0).astype(int).tolist(), strict=True),
    )
    conn.commit()
    conn.close()


# -- naive references: what a straightforward per-row implementation does ----------------------------
def naive_read(db: Path, limit: int) -> list[dict]:
    conn = connect_readonly(db)
    cur = conn.execute(
        "SELECT m.id, s.source_text, s.template, m.mutant, m.DMS_score FROM mutations m "
        "JOIN sources s ON s.id = m.source ORDER BY m.id LIMIT ?",
        (limit,),
    )
    rows = []
    for rid, source, template, mutant, score in cur:
        rows.append({"id": rid, "source": source, "template": template, "mutant": mutant, "score": score})
    conn.close()
    return rows


def naive_mutate_encode(rows: list[dict]) -> np.ndarray:
    ids = {c: i + 1 for i, c in enumerate(get_vocab_processor("IUPAC").alphabet)}
    out = []
    for row in rows:
        seq = list(row["template"])
        if row["mutant"]:
            for sub in row["mutant"].split(":"):
                wt, pos, mt = sub[0], int(sub[1:-1]), sub[-1]
                if seq[pos - 1] != wt:
                    raise ValueError(f"row {row['id']}: mismatch")
                seq[pos - 1] = mt
        out.append([ids[c] for c in seq])
    return np.array(out, dtype=np.uint8)


def naive_load(db: Path, limit: int) -> dict:
    """What load_variants returns, computed row by row: the reference for the end-to-end stage."""
    import pandas as pd

    vocab = get_vocab_processor("IUPAC")
    ids_of = {c: i + 1 for i, c in enumerate(vocab.alphabet)}
    out = {
        "id": [],
        "source_text": [],
        "mutant": [],
        "mut_num": [],
        "first_pos": [],
        "DMS_score": [],
        "sequence": [],
        "tokens": [],
    }
    for row in naive_read(db, limit):
        if row["score"] is None:
            continue
        seq = list(row["template"])
        positions = []
        for sub in filter(None, row["mutant"].split(":")):
            wt, pos, mt = sub[0], int(sub[1:-1]), sub[-1]
            if not 1 <= pos <= len(seq) or seq[pos - 1] != wt:
                raise ValueError(f"row {row['id']}: {row['mutant']} does not fit the template")
            seq[pos - 1] = mt
            positions.append(pos)
        out["id"].append(row["id"])
        out["source_text"].append(row["source"])
        out["mutant"].append(row["mutant"])
        out["mut_num"].append(len(positions))
        out["first_pos"].append(min(positions, default=0))
        out["DMS_score"].append(row["score"])
        out["sequence"].append("".join(seq))
        out["tokens"].append([ids_of[c] for c in seq])
    tokens = np.array(out.pop("tokens"), dtype=np.uint8)
    first_pos = np.array(out.pop("first_pos"), dtype=np.int32)
    frame = pd.DataFrame(out)
    return {"tokens": tokens, "target": frame["DMS_score"].to_numpy(np.float32), "first_pos": first_pos, "frame": frame}


# -- stages, each run in its own process -------------------------------------------------------------
def _data(db: Path, limit: int | None = None) -> DataSpec:
    return DataSpec(db=str(db), limit=limit)


def stage(name: str, db: Path, naive_n: int) -> dict:
    data = _data(db)
    if name == "sql":
        conn = connect_readonly(db)
        layout = read_layout(conn)
        sql, params, _ = build_query(data, layout)
        t = time.perf_counter()
        # the read load_variants does: ADBC (parallel id ranges when it pays), else sqlite3's aggregate
        columns = read_columns_arrow(db, sql, params, [], read_parts(conn, data, layout))
        if columns is None:
            columns = read_columns(conn, sql, params, [])
        elapsed = time.perf_counter() - t
        n = columns[0].size
    elif name == "sql_naive":
        t = time.perf_counter()
        n = len(naive_read(db, naive_n))
        elapsed = time.perf_counter() - t
    elif name == "mutate":
        conn = connect_readonly(db)
        template = conn.execute("SELECT template FROM sources").fetchone()[0]
        mutants = np.array([m for (m,) in conn.execute("SELECT mutant FROM mutations ORDER BY id")], dtype=object)
        vocab = get_vocab_processor("IUPAC")
        t = time.perf_counter()
        result = apply_mutants([template], np.zeros(mutants.size, dtype=np.int64), mutants, vocab)
        elapsed = time.perf_counter() - t
        n = result.tokens.shape[0]
    elif name == "mutate_naive":
        rows = naive_read(db, naive_n)
        t = time.perf_counter()
        n = naive_mutate_encode(rows).shape[0]
        elapsed = time.perf_counter() - t
    elif name == "e2e":
        t = time.perf_counter()
        n = len(load_variants(data))
        elapsed = time.perf_counter() - t
    elif name == "e2e_naive":
        t = time.perf_counter()
        naive = naive_load(db, naive_n)
        elapsed = time.perf_counter() - t
        n = naive["tokens"].shape[0]
        fast = load_variants(_data(db, limit=naive_n))  # same rows: the two must agree exactly
        assert np.array_equal(fast.tokens, naive["tokens"]) and np.array_equal(fast.target, naive["target"])
        assert np.array_equal(fast.first_pos, naive["first_pos"])
        assert fast.frame["sequence"].tolist() == naive["frame"]["sequence"].tolist()
    else:
        raise SystemExit(f"unknown stage {name}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stage": name, "n": n, "seconds": elapsed, "per_s": n / elapsed, "peak_rss_mb": peak_mb}


def run_stage(name: str, db: Path, naive_n: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--stage", name, "--db", str(db), "--naive-n", str(naive_n)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark infra's data path against a naive per-row reference.")
    parser.add_argument("--n", type=int, default=1_000_000, help="variants in the synthetic database")
    parser.add_argument("--length", type=int, default=300, help="template length (>= 250 for the target)")
    parser.add_argument("--naive-n", type=int, default=20_000, help="subsample for the naive reference")
    parser.add_argument("--db", type=Path, help="reuse/keep the synthetic database here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(stage(args.stage, args.db, args.naive_n)))
        return
    tmp = None
    db = args.db
    if db is None:
        tmp = tempfile.TemporaryDirectory()
        db = Path(tmp.name) / "synthetic.sqlite"
    if not db.exists():
        t = time.perf_counter()
        make_db(db, args.n, args.length)
        print(
            f"built {db} ({args.n:,} variants, length {args.length}) in {time.perf_counter() - t:.1f} s",
            file=sys.stderr,
        )
    results = {}
    for fast, naive, label in (
        ("sql", "sql_naive", "(a) SQL read"),
        ("mutate", "mutate_naive", "(b) mutate + encode"),
        ("e2e", "e2e_naive", "(c) end to end"),
    ):
        f, s = run_stage(fast, db, args.naive_n), run_stage(naive, db, args.naive_n)
        results[fast] = {"label": label, "fast": f, "naive": s, "speedup": f["per_s"] / s["per_s"]}
    if args.json:
        print(json.dumps({"n": args.n, "length": args.length, "cpus": os.cpu_count(), "results": results}))
    else:
        print(f"{args.n:,} variants, length {args.length}; naive reference on {args.naive_n:,} rows")
        print(f"{'stage':<22}{'variants/s':>14}{'peak MB':>10}{'naive/s':>12}{'naive MB':>10}{'speed-up':>10}")
        for r in results.values():
            f, s = r["fast"], r["naive"]
            print(
                f"{r['label']:<22}{f['per_s']:>14,.0f}{f['peak_rss_mb']:>10,.0f}{s['per_s']:>12,.0f}"
                f"{s['peak_rss_mb']:>10,.0f}{r['speedup']:>9.1f}x"
            )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
