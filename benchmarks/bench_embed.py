"""The `plm` embedding stage vs a bare `model(**batch)` loop, and a cache hit vs the first computation.

A small random-initialised ESM (tests/plm_model.py; weights cannot be downloaded here) in a
temporary model store, and N variants (1–3 substitutions) of a random template of `--length` residues.

- bare: the variants tokenised once by the model's own tokenizer (outside the timing), in the
  stage's batches (length-sorted, `--batch-size`), then `model(**batch)` under `torch.no_grad`
  (bf16 autocast on CUDA), the hidden states moved to the host;
- plm: `PLMEmbedding.prepare` over the same variants with the model already loaded: letters to ids,
  batches, forward, pooling, the features written to the embedding cache. Target ≥ 0.8× bare;
- first / second experiment: the embedding stage as an experiment sees it (a fresh embedding:
  model load, computation and cache write; then another fresh embedding reading the cache).
  Target: the second ≥ 20× faster.

Usage: nice python benchmarks/bench_embed.py [--n 2000] [--length 286] [--device cpu|cuda]
       [--hidden 64] [--layers 4] [--batch-size 32] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from runner.core import plm  # noqa: E402
from runner.core.vocab import IUPAC_AMINO_ACIDS, get_vocab_processor  # noqa: E402
from tests.plm_model import make_tiny_esm  # noqa: E402


def make_variants(n: int, length: int, seed: int = 0) -> tuple[str, list[str]]:
    """A random template and n sequences with 1–3 random substitutions."""
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(IUPAC_AMINO_ACIDS.encode(), dtype=np.uint8)
    template = letters[rng.integers(0, 20, length)]
    rows = np.repeat(template[None, :], n, axis=0)
    for j in range(3):
        pick = rng.random(n) < (1.0 if j == 0 else 0.5)
        pos = rng.integers(0, length, n)
        rows[pick, pos[pick]] = letters[rng.integers(0, 20, int(pick.sum()))]
    return template.tobytes().decode(), [r.tobytes().decode() for r in rows]


def bare_rate(encoder: plm.Encoder, sequences: list[str], batch_size: int) -> float:
    """Sequences per second of `model(**batch)` over pre-tokenised, length-sorted batches."""
    order = np.argsort([len(s) for s in sequences], kind="stable")
    batches = [
        encoder.tokenizer([sequences[i] for i in order[s : s + batch_size]], padding=True, return_tensors="pt")
        for s in range(0, len(sequences), batch_size)
    ]
    device = encoder.device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with torch.no_grad(), autocast:
        encoder.model(**batches[0])  # warm-up
        _sync(device)
        started = time.perf_counter()
        for batch in batches:
            encoder.model(**batch).last_hidden_state.float().cpu()
        _sync(device)
    return len(sequences) / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--length", type=int, default=286)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    vocab = get_vocab_processor("IUPAC")
    template, sequences = make_variants(args.n, args.length)
    tokens = vocab.encode(sequences)
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        store = Path(tmp) / "models"
        make_tiny_esm(store, "bench-esm", hidden=args.hidden, layers=args.layers, heads=4)
        os.environ[plm.ENV_STORE] = str(store)

        def embedding() -> plm.PLMEmbedding:
            return plm.PLMEmbedding(vocab, "bench-esm", batch_size=args.batch_size)

        # first and second experiment: each a fresh embedding, as a new experiment process has
        os.environ[plm.ENV_CACHE] = str(Path(tmp) / "cache-runs")
        first = embedding()
        started = time.perf_counter()
        first.prepare(tokens, [template], device=device)
        first_s = time.perf_counter() - started
        loads = plm.model_loads()
        started = time.perf_counter()
        embedding().prepare(tokens, [template], device=device)
        second_s = time.perf_counter() - started
        assert plm.model_loads() == loads, "the second experiment loaded the model: no cache hit"

        # throughput: the stage with its model loaded, into a fresh cache, against the bare loop;
        # alternated and the best of `--repeats` each (this machine's cores are shared)
        encoder = plm.load_encoder(first.folder, device)  # an experiment drops its own after `prepare`
        bare = stage = 0.0
        for repeat in range(args.repeats):
            bare = max(bare, bare_rate(encoder, sequences, args.batch_size))
            os.environ[plm.ENV_CACHE] = str(Path(tmp) / f"cache-rate-{repeat}")
            warm = embedding()
            warm._encoder = encoder
            _sync(device)
            started = time.perf_counter()
            warm.prepare(tokens, [template], device=device)
            _sync(device)
            stage = max(stage, args.n / (time.perf_counter() - started))

    result = {
        "n": args.n,
        "length": args.length,
        "device": str(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "model": {"hidden": args.hidden, "layers": args.layers},
        "batch_size": args.batch_size,
        "bare_seq_per_s": round(bare, 1),
        "plm_seq_per_s": round(stage, 1),
        "plm_vs_bare": round(stage / bare, 3),
        "first_experiment_s": round(first_s, 3),
        "second_experiment_s": round(second_s, 4),
        "hit_speedup": round(first_s / second_s, 1),
    }
    print(f"embedding stage, {args.n} variants of {args.length} aa, {result['device']} {result['precision']}")
    print(f"  {'bare model(**batch)':<34}{bare:>12.1f} seq/s")
    print(f"  {'plm stage (model loaded)':<34}{stage:>12.1f} seq/s   {stage / bare:.2f}x bare (target >= 0.8)")
    print(f"  {'first experiment (miss)':<34}{first_s:>12.3f} s")
    print(
        f"  {'second experiment (cache hit)':<34}{second_s:>12.4f} s   {first_s / second_s:.0f}x faster (target >= 20)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
