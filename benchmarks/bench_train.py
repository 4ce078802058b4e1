"""Training throughput of the core (Lightning, device-resident token batches) vs a plain PyTorch loop.

Same model (a built-in, default params), same embedding, same GB1-shaped data (N × 56 uint8 tokens,
random), same batch size and precision. The plain loop is the yardstick of DESIGN §8: tokens resident
on the device, one-hot per batch, AdamW, no framework. Target: core / plain ≥ 0.9 on a GPU.

Usage: python benchmarks/bench_train.py [--device cpu|cuda] [--precision 32|bf16-mixed] [--model cnn]
                                        [--n 149361] [--epochs 3] [--batch-size 1024] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from runner.core.training import VariantDataModule, VariantModule, build_trainer  # noqa: E402
from runner.plan.models import TrainSpec  # noqa: E402

L_SEQ = 56


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 21, size=(n, L_SEQ), dtype=np.uint8)
    target = rng.normal(size=n).astype(np.float32)
    return tokens, target


def new_module(model: str, lr: float) -> VariantModule:
    return VariantModule(
        model_name=model,
        model_params={},
        embedding_name="onehot",
        embedding_params={},
        vocab_name="IUPAC",
        vocab_params={},
        seq_len=L_SEQ,
        lr=lr,
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_loop(tokens, target, args) -> float:
    """The yardstick: device-resident tokens, per-batch embedding, autocast when bf16."""
    torch.manual_seed(0)
    module = new_module(args.model, args.lr).to(args.device)
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr)  # the core's default optimizer, built by hand
    tt = torch.from_numpy(tokens).to(args.device)
    yy = torch.from_numpy(target).to(args.device)
    n = len(tt)
    bf16 = args.precision == "bf16-mixed"
    sync(args.device)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(args.device)
        for start in range(0, n, args.batch_size):
            idx = perm[start : start + args.batch_size]
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                loss = F.mse_loss(module(tt[idx]).float(), yy[idx])
            penalty = module.model.penalty()
            if penalty is not None:
                loss = loss + penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sync(args.device)
    return n * args.epochs / (time.perf_counter() - t0)


def core(tokens, target, args) -> float:
    """The core's own pieces: VariantModule + VariantDataModule + build_trainer (checkpointing included)."""
    torch.manual_seed(0)
    n = len(tokens)
    split = {"train": np.arange(n), "val": np.zeros(0, dtype=np.int64), "test": np.arange(min(n, 10))}
    with tempfile.TemporaryDirectory() as tmp:
        train = TrainSpec(
            max_epochs=args.epochs,
            precision=args.precision,
            early_stopping_patience=0,
            accelerator="gpu" if args.device == "cuda" else "cpu",
            batch_size=args.batch_size,
        )
        trainer = build_trainer(train, Path(tmp) / "ckpts", has_val=False, callbacks=[])
        dm = VariantDataModule(tokens, target, split, args.batch_size)
        module = new_module(args.model, args.lr)
        sync(args.device)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        sync(args.device)
        return n * args.epochs / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="32 or bf16-mixed (default: bf16-mixed on cuda, else 32)")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--n", type=int, default=None, help="variants (default 149,361 on cuda, 20,000 on cpu)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32")
    args.n = args.n or (149_361 if args.device == "cuda" else 20_000)
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    tokens, target = make_data(args.n)
    plain_loop(tokens[: min(args.n, 8 * args.batch_size)], target[: min(args.n, 8 * args.batch_size)], args)  # warm-up
    out = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": args.model,
        "n": args.n,
        "L": L_SEQ,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }
    out["plain_samples_per_s"] = round(plain_loop(tokens, target, args))
    out["core_samples_per_s"] = round(core(tokens, target, args))
    out["ratio"] = round(out["core_samples_per_s"] / out["plain_samples_per_s"], 3)
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
