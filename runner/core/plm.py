"""The built-in `plm` embedding: pooled protein language-model features, computed once per data set.

A pLM (ESM-2 or any `AutoModel`-loadable protein encoder with a one-token-per-residue tokenizer) is
far too costly to run per batch per epoch, so `PLMEmbedding` is not a per-batch expansion like
`onehot`: before training, `prepare(tokens, templates, source)` gets the experiment's whole token
matrix once and reads (or computes and writes) the pooled features of every row from the embedding
cache; `forward(tokens)` then looks rows up by their tokens (`RowIndex`) and returns `[B, 1, C]`:
one "position" of C pooled features (`out_len = 1`, so the model is built for length 1). A row
never seen (new sequences at predict time) is computed through the same code and memoised.

The model comes from the node's model store, `$INFRA_MODEL_STORE/<model>/` (a Hugging Face-format
folder plus the `infra-model.json` that `infra models add` writes), loaded offline from safetensors
with no remote code. Its weights are never part of the experiment's checkpoint (the transformers
model is held outside the registered submodules); only their sha256 is (the `weights_sha256`
buffer), so `infra predict` refuses a store whose weights changed since training.

Cache (`$INFRA_EMBED_CACHE`, the workdir's `cache/embeddings`): `<key>.npy` (float32 `[N, C]`, rows
in the order of the sequences) and `<key>.json` (meta), key = sha256 of the canonical JSON of
{"weights", "layer", "pooling", "sequences": sha256 of the ordered sequences joined by "\\n",
"templates": sha256 of each row's wild-type template joined by "\\n" for `mutated` pooling, null for
`mean`}. Written atomically (a temporary file in the same folder, then `os.replace`), read
memory-mapped and checked (shape, dtype, finite: a bad file is recomputed with a warning); a
`<key>.lock` file lock makes a second process computing the same key wait and then read.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runner.core.registry import ParamError
from runner.errors import DataError

log = logging.getLogger(__name__)

ENV_STORE = "INFRA_MODEL_STORE"
ENV_CACHE = "INFRA_EMBED_CACHE"
MODEL_INFO = "infra-model.json"
POOLINGS = ("mean", "mutated")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
SCRATCH_ROWS = 1 << 17  # rows memoised beyond the prepared ones before the memo starts afresh

_loads = 0  # pLMs loaded by this process


def model_loads() -> int:
    """How many pLMs this process has loaded (a cache hit loads none; tests and benchmarks check it)."""
    return _loads


# --- the model store ------------------------------------------------------------------------------


def model_dir(name: str) -> Path:
    """`$INFRA_MODEL_STORE/<name>`, or ParamError naming what is missing and what to do."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ParamError(
            f"embeddings.params.model: {name!r} is not a model store name ([a-z0-9][a-z0-9._-]{{0,63}}); "
            "see 'infra models list'"
        )
    store = os.environ.get(ENV_STORE)
    if not store:
        raise ParamError(
            f"embeddings.params.model {name!r}: {ENV_STORE} is not set; set the node's model store "
            "('infra config set model_store PATH') and add the model ('infra models add NAME DIR')"
        )
    folder = Path(store) / name
    if not (folder / "config.json").is_file():
        raise ParamError(
            f"embeddings.params.model {name!r}: no model {name!r} in the model store {store} "
            f"(no {folder}/config.json); add it with 'infra models add {name} DIR'"
        )
    return folder


def weights_sha256(folder: Path) -> str:
    """The content hash `infra models add` recorded in `<folder>/infra-model.json`."""
    path = folder / MODEL_INFO
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ParamError(
            f"embeddings.params.model: {path} is missing or unreadable ({type(exc).__name__}); "
            f"register the model with 'infra models add {folder.name} DIR'"
        ) from None
    sha = doc.get("sha256") if isinstance(doc, dict) else None
    if not isinstance(sha, str) or not SHA256.fullmatch(sha):
        raise ParamError(f"embeddings.params.model: {path} has no sha256; add the model again with 'infra models add'")
    return sha


def model_shape(folder: Path) -> tuple[int, int]:
    """(hidden size, layers) from the model's config.json, without importing transformers."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return int(config["hidden_size"]), int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ParamError(
            f"embeddings.params.model: {folder}/config.json has no usable hidden_size/num_hidden_layers ({exc})"
        ) from None


# --- the encoder ----------------------------------------------------------------------------------


@dataclass
class Encoder:
    """A loaded pLM, and how residue letters become its input ids (`table`: ASCII code -> id)."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    table: np.ndarray | None = None  # int64[256], -1 where the tokenizer was not asked yet
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()
    pad_id: int = 0
    spaced: bool = False  # the tokenizer wants residues separated by spaces (ProtBert style)


def load_encoder(folder: Path, device: torch.device) -> Encoder:
    """Load the pLM in `folder` offline (local files, safetensors, no remote code) onto `device`."""
    global _loads
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    log.info("plm: loading model %s on %s", folder, device)
    options = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = AutoConfig.from_pretrained(folder, **options)
        extra = {}
        model_class = transformers.models.auto.modeling_auto.MODEL_MAPPING.get(type(config), None)
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            extra["add_pooling_layer"] = False  # the pooler is unused (and untrained in ESM-2)
        model = AutoModel.from_pretrained(folder, config=config, use_safetensors=True, **options, **extra)
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    except Exception as exc:  # transformers and safetensors raise many kinds for a folder they cannot use
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise DataError(
            f"embeddings.params.model: cannot load the model in {folder} ({type(exc).__name__}: {first})"
        ) from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    _loads += 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    log.info("plm: model loaded in %.2fs", time.perf_counter() - started)
    return Encoder(model, tokenizer, device, pad_id=int(pad))


def _learn_letters(encoder: Encoder, letters: bytes, folder: Path) -> None:
    """Teach `encoder.table` the ids of `letters` from the tokenizer itself: one probe of all of them
    must give one token per residue (plain, or spaced as ProtBert wants) between fixed special tokens."""
    if encoder.table is None:
        encoder.table = np.full(256, -1, dtype=np.int64)
    todo = bytes(sorted({b for b in letters if encoder.table[b] < 0}))
    if not todo:
        return
    probe = todo.decode("ascii")
    learned = encoder.prefix or encoder.suffix
    for spaced in (encoder.spaced,) if learned else (False, True):
        enc = encoder.tokenizer(" ".join(probe) if spaced else probe, return_special_tokens_mask=True)
        ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
        residue = [i for i, s in enumerate(special) if not s]
        if len(residue) != len(probe) or residue != list(range(residue[0], residue[0] + len(residue))):
            continue
        prefix, suffix = tuple(ids[: residue[0]]), tuple(ids[residue[-1] + 1 :])
        if learned and (prefix, suffix) != (encoder.prefix, encoder.suffix):
            continue  # special tokens that depend on the letters: not a per-residue tokenizer
        encoder.prefix, encoder.suffix, encoder.spaced = prefix, suffix, spaced
        encoder.table[np.frombuffer(todo, dtype=np.uint8)] = [ids[i] for i in residue]
        return
    raise DataError(
        f"embeddings.params.model: the tokenizer of {folder} does not give one token per residue for "
        f"{probe!r}; the plm embedding needs a per-residue tokenizer (ESM-2 style)"
    )


def _residues(ascii: np.ndarray) -> np.ndarray:
    """Upper-case letters (pLM vocabularies are upper-case); padding stays 0."""
    return np.where((ascii >= 97) & (ascii <= 122), ascii - 32, ascii).astype(np.uint8)


def pool_features(
    encoder: Encoder,
    folder: Path,
    ascii: np.ndarray,
    lengths: np.ndarray,
    out: np.ndarray,
    *,
    layer: int,
    pooling: str,
    batch_size: int,
    mutated: np.ndarray | None = None,
    progress: str = "embedding",
) -> None:
    """Pooled features of every row of the ASCII matrix (right-padded with 0) into `out[N, C]`.

    Batched in order of length (the padding per batch stays small), under `torch.no_grad`, in bf16
    autocast on CUDA; only one batch's hidden states exist at a time. `mutated` (bool [N, L]): the
    positions pooled for `mutated` pooling (a row with none is mean-pooled). Logs progress about
    every tenth of the rows.
    """
    n = len(ascii)
    residues = _residues(ascii)
    _learn_letters(encoder, np.unique(residues[residues > 0]).tobytes(), folder)
    order = np.argsort(lengths, kind="stable")
    step = max(n // 10, 1)
    next_report, started = step, time.perf_counter()
    device = encoder.device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    pre, post = len(encoder.prefix), len(encoder.suffix)
    last_is_layer = False
    with torch.no_grad(), autocast:
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            lens = lengths[rows].astype(np.int64)
            width = int(lens.max()) if len(lens) else 0
            t = pre + width + post
            ids = np.full((len(rows), t), encoder.pad_id, dtype=np.int64)
            ids[:, :pre] = encoder.prefix
            positions = np.arange(width)[None, :]
            inside = positions < lens[:, None]
            letters = encoder.table[residues[rows, :width]]
            ids[:, pre : pre + width] = np.where(inside, letters, encoder.pad_id)
            for j, token in enumerate(encoder.suffix):
                ids[np.arange(len(rows)), pre + lens + j] = token
            attention = np.arange(t)[None, :] < (pre + lens + post)[:, None]
            pooled = inside.copy()
            if pooling == "mutated" and mutated is not None:
                chosen = inside & mutated[rows, :width]
                some = chosen.any(1)
                pooled[some] = chosen[some]
            weight = np.zeros((len(rows), t), dtype=np.float32)
            weight[:, pre : pre + width] = pooled
            batch_ids = torch.from_numpy(ids).to(device)
            mask = torch.from_numpy(attention.astype(np.int64)).to(device)
            if last_is_layer:  # the model's output is the layer asked for: no per-layer copies kept
                hidden = encoder.model(input_ids=batch_ids, attention_mask=mask).last_hidden_state.float()
            else:
                output = encoder.model(input_ids=batch_ids, attention_mask=mask, output_hidden_states=True)
                hidden = output.hidden_states[layer].float()
                # layer -1 is usually the model's own output (ESM's final layer norm included): seen
                # once on the first batch, later batches ask for that output alone
                last_is_layer = (
                    start == 0 and layer == -1 and torch.equal(output.hidden_states[-1], output.last_hidden_state)
                )
            w = torch.from_numpy(weight).to(device)
            features = (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0)
            out[rows] = features.cpu().numpy()
            done = start + len(rows)
            if done >= next_report or done == n:
                log.info(
                    "%s: %d/%d sequences (%.0f/s)", progress, done, n, done / max(time.perf_counter() - started, 1e-9)
                )
                next_report = done + step


# --- the cache ------------------------------------------------------------------------------------


def _joined_sha(rows) -> str:
    digest = hashlib.sha256()
    for i, row in enumerate(rows):
        if i:
            digest.update(b"\n")
        digest.update(row)
    return digest.hexdigest()


def cache_key(weights: str, layer: int, pooling: str, sequences: list[bytes], templates: list[bytes] | None) -> str:
    """The content address of the features of `sequences` (ordered) under the given model settings."""
    doc = {
        "weights": weights,
        "layer": int(layer),
        "pooling": pooling,
        "sequences": _joined_sha(sequences),
        "templates": _joined_sha(templates) if templates is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class EmbeddingCache:
    """The folder of cached feature matrices (see the module docstring)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def from_env(cls) -> EmbeddingCache | None:
        folder = os.environ.get(ENV_CACHE)
        return cls(Path(folder)) if folder else None

    def read(self, key: str, n: int, dim: int) -> np.ndarray | None:
        """The cached `[n, dim]` float32 features (memory-mapped), or None when absent or unusable."""
        path = self.folder / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            problem = None
            if array.dtype != np.float32 or array.shape != (n, dim):
                problem = f"{array.dtype} {array.shape}, expected float32 ({n}, {dim})"
            elif not all(np.isfinite(array[i : i + 65536]).all() for i in range(0, n, 65536)):
                problem = "non-finite values"
        except (OSError, ValueError, EOFError) as exc:
            array, problem = None, f"unreadable ({exc})"
        if problem is None:
            return array
        log.warning("embedding cache %s is unusable (%s); computing it again", path, problem)
        return None

    def compute(self, key: str, n: int, dim: int, fill, meta: dict) -> np.ndarray:
        """The features of `key`: read, or (under `<key>.lock`, so one process computes and the others
        wait and read) computed by `fill(out)` into a temporary file renamed into place."""
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        cached = self.read(key, n, dim)
        if cached is not None:
            return cached
        lock = FileLock(str(self.folder / f"{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("plm: waiting for %s.lock: another run computes these features", key[:12])
            lock.acquire()
        try:
            cached = self.read(key, n, dim)  # another process may have computed it while this one waited
            if cached is not None:
                log.info("embedding cache %s.npy written by another run meanwhile; read", key[:12])
                return cached
            started = time.perf_counter()
            tmp = self.folder / f".{key}.{secrets.token_hex(6)}.npy.tmp"
            try:
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
                fill(out)
                out.flush()
                del out
                os.replace(tmp, self.folder / f"{key}.npy")
            except OSError as exc:  # a full disk, or the file removed meanwhile (infra prune --cache)
                raise DataError(
                    f"embedding cache {self.folder}: the features could not be written ({exc.strerror or exc}); "
                    "free space or run again"
                ) from None
            finally:
                tmp.unlink(missing_ok=True)
            seconds = time.perf_counter() - started
            doc = {
                **meta,
                "n": n,
                "dim": dim,
                "created_at": datetime.now(UTC).isoformat(),
                "seconds": round(seconds, 3),
            }
            tmp_meta = self.folder / f".{key}.{secrets.token_hex(6)}.json.tmp"
            tmp_meta.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp_meta, self.folder / f"{key}.json")
            log.info("embedding cache %s.npy written (%d × %d) in %.2fs", key[:12], n, dim, seconds)
        finally:
            lock.release()
        result = self.read(key, n, dim)
        if result is None:
            raise DataError(f"embedding cache {self.folder / key}.npy could not be read back after writing it")
        return result


# --- rows by their tokens -------------------------------------------------------------------------


class RowIndex:
    """Feature rows found by their token rows, on the device of the batches (no host loop per row).

    Each token row gets a 64-bit hash (a fixed random linear form, wrapping; padding contributes
    nothing, so the same sequence padded to another width has the same hash); hashes are sorted
    and searched, and a hit is confirmed by comparing the stored tokens, so a collision can only
    cost a recomputation, never a wrong feature.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.tokens = torch.zeros(0, 0, dtype=torch.uint8)
        self.features = torch.zeros(0, dim)
        self.hashes = torch.zeros(0, dtype=torch.int64)
        self.order = torch.zeros(0, dtype=torch.int64)
        self._weights = torch.zeros(0, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.features)

    def _weights_for(self, width: int, device) -> torch.Tensor:
        if len(self._weights) < width:
            gen = torch.Generator().manual_seed(0x1F0E)
            self._weights = torch.randint(1, 2**62, (max(width, 512),), generator=gen, dtype=torch.int64) | 1
        return self._weights[:width].to(device)

    def hash(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens.long() * self._weights_for(tokens.shape[1], tokens.device)).sum(1)

    def to(self, device) -> RowIndex:
        self.tokens, self.features = self.tokens.to(device), self.features.to(device)
        self.hashes, self.order = self.hashes.to(device), self.order.to(device)
        return self

    def replace(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        self.tokens, self.features = tokens, features
        hashes = self.hash(tokens)
        self.hashes, self.order = torch.sort(hashes)

    def add(self, tokens: torch.Tensor, features: torch.Tensor) -> None:
        if len(self):  # the known rows first, then the new ones: tokens and features in one order
            old, new = _same_width(self.tokens.to(tokens.device), tokens)
            tokens = torch.cat([old, new])
            features = torch.cat([self.features.to(features.device), features])
        self.replace(tokens, features)

    def find(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row index into `features`, found) for each row of `tokens`."""
        if not len(self):
            return torch.zeros(len(tokens), dtype=torch.long, device=tokens.device), torch.zeros(
                len(tokens), dtype=torch.bool, device=tokens.device
            )
        if self.hashes.device != tokens.device:
            self.to(tokens.device)
        h = self.hash(tokens)
        pos = torch.searchsorted(self.hashes, h).clamp_max(len(self) - 1)
        idx = self.order[pos]
        known, query = _same_width(self.tokens[idx], tokens)
        found = (self.hashes[pos] == h) & (known == query).all(1)
        return idx, found


def _same_width(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two token matrices right-padded (with 0, the padding id) to the wider one's width."""
    width = max(a.shape[1], b.shape[1])
    pad = torch.nn.functional.pad
    return pad(a, (0, width - a.shape[1])), pad(b, (0, width - b.shape[1]))


# --- the embedding --------------------------------------------------------------------------------


class PLMEmbedding(nn.Module):
    """Pooled pLM features per variant, `[B, 1, C]` (see the module docstring)."""

    out_len = 1  # one "position" of pooled features: the model is built for length 1

    def __init__(self, vocab, model: str, layer: int = -1, pooling: str = "mean", batch_size: int = 32):
        super().__init__()
        if pooling not in POOLINGS:
            raise ParamError(f"embeddings.params.pooling: must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ParamError(f"embeddings.params.batch_size: must be a positive integer, not {batch_size!r}")
        self.folder = model_dir(model)
        self.dim, n_layers = model_shape(self.folder)
        if not isinstance(layer, int) or isinstance(layer, bool) or not -(n_layers + 1) <= layer <= n_layers:
            raise ParamError(
                f"embeddings.params.layer: {layer!r} is outside -{n_layers + 1}..{n_layers} for model {model!r} "
                f"({n_layers} layers; 0 is the embedding layer's output, -1 the last layer)"
            )
        self.model_name, self.layer, self.pooling, self.batch_size = model, layer, pooling, batch_size
        self.vocab = vocab
        sha = weights_sha256(self.folder)
        # saved with the experiment (32 bytes), so prediction can tell when the store's weights changed
        self.register_buffer("weights_sha256", torch.tensor(list(bytes.fromhex(sha)), dtype=torch.uint8))
        self._store_sha = sha
        self._encoder: Encoder | None = None  # a plain attribute: the pLM's weights stay out of state_dict
        self._base = RowIndex(self.dim)  # the prepared rows (the experiment's data set)
        self._scratch = RowIndex(self.dim)  # rows computed since (predict chunks, unseen rows)
        self._templates: list[str] = []
        self.compute_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- what the computation needs

    def _check_weights(self) -> str:
        trained = bytes(self.weights_sha256.cpu().tolist()).hex()
        if trained != self._store_sha:
            raise DataError(
                f"embeddings.params.model {self.model_name!r}: the weights in the model store ({self._store_sha[:12]}) "
                f"are not those this experiment was trained with ({trained[:12]}); add the original weights "
                "back, or train again"
            )
        return trained

    def _encoder_on(self, device: torch.device) -> Encoder:
        if self._encoder is None or self._encoder.device != device:
            encoder = load_encoder(self.folder, device)
            # `infra models add --replace` swaps the folder whole: weights loaded across the swap would
            # be cached under the old weights' key. The manifest read again after loading tells.
            now = weights_sha256(self.folder)
            if now != self._store_sha:
                raise DataError(
                    f"embeddings.params.model {self.model_name!r}: the model store's folder changed while it was "
                    f"loaded ({self._store_sha[:12]} -> {now[:12]}, e.g. 'infra models add --replace'); run again"
                )
            self._encoder = encoder
        return self._encoder

    def _ascii(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ASCII letters of a token matrix (padding 0) and each row's length."""
        ascii = self.vocab.inverse[np.asarray(tokens, dtype=np.uint8)]
        return ascii, (tokens != self.vocab.pad_id).sum(axis=1).astype(np.int64)

    def _mutated(self, ascii: np.ndarray, templates: list[str], source: np.ndarray) -> np.ndarray:
        """Bool [N, L]: where each row differs from its template (case-insensitive)."""
        width = ascii.shape[1]
        table = np.zeros((len(templates), width), dtype=np.uint8)
        for i, template in enumerate(templates):
            raw = template.encode("ascii", "replace")[:width]
            table[i, : len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        return _residues(ascii) != _residues(table[source])

    def _fill(self, tokens: np.ndarray, templates: list[str], source: np.ndarray, out: np.ndarray, device) -> None:
        """Features of every row into `out`: rows already known are copied, the others computed."""
        query = torch.from_numpy(np.ascontiguousarray(tokens)).to(self._base.features.device)
        idx, found = self._find(query)
        found_np = found.cpu().numpy()
        if found_np.any():
            out[np.flatnonzero(found_np)] = self._features_of(idx[found], found)
        todo = np.flatnonzero(~found_np)
        if not len(todo):
            return
        ascii, lengths = self._ascii(tokens[todo])
        mutated = self._mutated(ascii, templates, source[todo]) if self.pooling == "mutated" else None
        part = out if len(todo) == len(tokens) else np.zeros((len(todo), self.dim), dtype=np.float32)
        pool_features(
            self._encoder_on(device),
            self.folder,
            ascii,
            lengths,
            part,
            layer=self.layer,
            pooling=self.pooling,
            batch_size=self.batch_size,
            mutated=mutated,
        )
        if part is not out:
            out[todo] = part

    def _find(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx, found = self._base.find(tokens)
        if len(self._scratch) and not bool(found.all()):
            idx2, found2 = self._scratch.find(tokens)
            extra = found2 & ~found
            idx = torch.where(extra, idx2 + len(self._base), idx)
            found = found | found2
        return idx, found

    def _features_of(self, idx: torch.Tensor, found: torch.Tensor) -> np.ndarray:
        base = len(self._base)
        out = np.empty((len(idx), self.dim), dtype=np.float32)
        idx = idx.cpu()
        in_base = idx < base
        if in_base.any():
            out[in_base.numpy()] = self._base.features[idx[in_base].to(self._base.features.device)].cpu().numpy()
        if (~in_base).any():
            rows = (idx[~in_base] - base).to(self._scratch.features.device)
            out[(~in_base).numpy()] = self._scratch.features[rows].cpu().numpy()
        return out

    # -- the hooks

    def prepare(
        self,
        tokens: np.ndarray,
        templates: list[str],
        source: np.ndarray | None = None,
        *,
        device: torch.device | str | None = None,
        compute: bool = True,
        scratch: bool = False,
    ) -> bool:
        """Make the features of every row of `tokens` available to `forward`, from the cache or computed
        (and cached) now. `templates[source[i]]` is row i's wild type (`mutated` pooling). With
        `compute=False` only a cached matrix is read (False when there is none). `scratch` rows
        (predict chunks) replace the previous scratch rows; the others are the base rows."""
        weights = self._check_weights()
        tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
        source = np.zeros(len(tokens), np.int64) if source is None else np.asarray(source, dtype=np.int64)
        self._templates = list(templates)
        if device is not None:
            self.compute_device = torch.device(device)
        ascii, lengths = self._ascii(tokens)
        sequences = [ascii[i, : lengths[i]].tobytes() for i in range(len(tokens))]
        row_templates = None
        if self.pooling == "mutated":
            encoded = [t.encode("ascii", "replace") for t in templates]
            row_templates = [encoded[s] for s in source]
        key = cache_key(weights, self.layer, self.pooling, sequences, row_templates)
        cache = EmbeddingCache.from_env()
        features = cache.read(key, len(tokens), self.dim) if cache is not None else None
        if features is not None:
            log.info("plm: %d sequences' features read from the embedding cache (%s)", len(tokens), key[:12])
        elif not compute:
            return False
        else:
            meta = {"model": self.model_name, "weights": weights, "layer": self.layer, "pooling": self.pooling}
            log.info("plm: computing the features of %d sequences with %s", len(tokens), self.model_name)

            def fill(out):
                self._fill(tokens, self._templates, source, out, self.compute_device)

            if cache is None:
                log.info("plm: %s is not set: the features are computed and not kept", ENV_CACHE)
                features = np.zeros((len(tokens), self.dim), dtype=np.float32)
                fill(features)
            else:
                features = cache.compute(key, len(tokens), self.dim, fill, meta)
        index = RowIndex(self.dim)
        with _quiet_readonly():  # a read-only memory map is shared as is on the CPU, never written
            index.replace(torch.from_numpy(tokens.copy()), torch.from_numpy(features))
        if scratch:
            self._scratch = index
        else:
            self._base = index
            self.release_encoder()  # every row of the experiment is known: the training needs the features only
        return True

    def release_encoder(self) -> None:
        """Drop the loaded pLM (its memory, on a GPU too); a row never seen loads it again."""
        if self._encoder is not None:
            self._encoder = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        idx, found = self._find(tokens)
        if not bool(found.all()):
            self._memoise(tokens[~found])
            idx, found = self._find(tokens)
        rows = self._features_of(idx, found) if len(self._scratch) else None
        if rows is None:
            features = self._base.features
            if features.device != tokens.device:
                self._base.to(tokens.device)
                features = self._base.features
            return features[idx].float()[:, None, :]
        return torch.from_numpy(rows).to(tokens.device)[:, None, :]

    def _memoise(self, tokens: torch.Tensor) -> None:
        """Compute rows never prepared (new sequences at predict time) and keep them in the scratch rows."""
        self._check_weights()
        new = torch.unique(tokens.cpu(), dim=0).numpy()
        if len(self._templates) > 1 and self.pooling == "mutated":
            raise DataError(
                "plm pooling 'mutated': a row outside the prepared ones and several templates; "
                "prepare the rows with their templates first"
            )
        out = np.zeros((len(new), self.dim), dtype=np.float32)
        with torch.inference_mode(False):
            self._fill(new, self._templates or [""], np.zeros(len(new), np.int64), out, self.compute_device)
        if len(self._scratch) + len(new) > SCRATCH_ROWS:
            self._scratch = RowIndex(self.dim)
        self._scratch.add(torch.from_numpy(new), torch.from_numpy(out))


@contextlib.contextmanager
def _quiet_readonly():
    """torch warns when wrapping a read-only array (the cache's memory map); it is only ever read."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The given NumPy array is not writable")
        yield
