"""A tiny random-initialised ESM model in a model store, for the `plm` embedding's tests and benchmark.

`make_tiny_esm(store, name)` writes `<store>/<name>/`: a Hugging Face-format directory (config.json,
model.safetensors, the ESM tokenizer's vocab.txt and configs) built from an `EsmConfig` with a few
small layers and rotary positions, plus the `infra-model.json` that `infra models add` writes
(`content_sha256`: sha256 over the sorted relative paths and bytes of every other file). Weights
cannot be downloaded on these machines; the real loading code runs on this one.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

# ESM-2's vocabulary (facebook/esm2_t6_8M_UR50D vocab.txt), in id order
ESM_VOCAB = [
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "<null_1>", "<mask>",
]  # fmt: skip
MODEL_INFO = "infra-model.json"


def content_sha256(folder: Path) -> tuple[str, int, list[str]]:
    """(sha256, bytes, files) of a model folder, as `infra models add` computes them
    (`runner.modelstore.model_sha256`: the one definition of a model's content hash)."""
    from runner.modelstore import _regular_files, model_sha256

    folder = Path(folder)
    files = _regular_files(folder)
    return model_sha256(folder), sum((folder / rel).stat().st_size for rel in files), files


def write_model_info(folder: Path, name: str) -> dict:
    """Write `<folder>/infra-model.json` as `infra models add` does; return its document."""
    sha, size, files = content_sha256(folder)
    doc = {"name": name, "sha256": sha, "bytes": size, "files": files, "added_at": datetime.now(UTC).isoformat()}
    (Path(folder) / MODEL_INFO).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def make_tiny_esm(
    store: Path, name: str = "tiny-esm", *, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0
) -> Path:
    """A random-initialised ESM (`EsmConfig`, rotary) saved in safetensors at `<store>/<name>/`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import EsmConfig, EsmModel, EsmTokenizer

    folder = Path(store) / name
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(ESM_VOCAB) + "\n", encoding="utf-8")
    config = EsmConfig(
        vocab_size=len(ESM_VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=1026,
        position_embedding_type="rotary",
        pad_token_id=ESM_VOCAB.index("<pad>"),
        mask_token_id=ESM_VOCAB.index("<mask>"),
        token_dropout=True,
        emb_layer_norm_before=False,
    )
    torch.manual_seed(seed)
    model = EsmModel(config, add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True)
    EsmTokenizer(vocab_file=str(vocab_file)).save_pretrained(folder)
    write_model_info(folder, name)
    return folder
