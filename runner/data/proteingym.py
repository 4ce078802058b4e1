"""`infra data import-proteingym`: every assay of a ProteinGym folder or zip (or the named ones), each
with its template from the reference file, all-or-nothing per assay, resumable."""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import sqlite3
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.data.importer import (
    FOLD_PREFIX,
    IDENTIFIER,
    ImportResult,
    _import_table,
    check_db_file,
    import_lock,
    source_name_problem,
)
from runner.data.rows import TEMPLATE, _Spec
from runner.data.tables import TABLE_SUFFIXES, Table, open_table, zip_tables
from runner.errors import DataError, InfraError, UsageError, shorten

# --- ProteinGym ------------------------------------------------------------------------------------

REFERENCE_NAME = "DMS_substitutions.csv"
# The reference is held in memory (one target_seq per assay): ProteinGym's is 208 KB for 217 assays.
MAX_REFERENCE_BYTES = 64 << 20

Opener = Callable[..., contextlib.AbstractContextManager[Table]]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assay:
    """One row of ProteinGym's reference file that matters for an import."""

    dms_id: str
    filename: str
    target_seq: str
    cutoff: float | None


@dataclass
class ProteinGymResult:
    """Per assay: imported (with its ImportResult), skipped (already there) or failed (with the error)."""

    db: str
    reference: str
    assays: list[dict] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for a in self.assays if a["status"] == status)

    def to_dict(self) -> dict:
        return {
            "db": self.db,
            "reference": self.reference,
            "imported": self.count("imported"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "assays": self.assays,
            "ignored_files": self.ignored_files,
        }


def read_reference(open_: Opener) -> dict[str, Assay]:
    """DMS_id -> Assay from ProteinGym's DMS_substitutions.csv (DMS_id, DMS_filename, target_seq, cutoff).

    Refused in one line: an id or file name that is not a safe source name, an id or file listed
    twice (which row is meant is not guessed), a file over MAX_REFERENCE_BYTES.
    """
    out: dict[str, Assay] = {}
    lines: dict[str, int] = {}  # DMS_id -> its line, and "file:" + DMS_filename -> its line
    with open_(max_bytes=MAX_REFERENCE_BYTES) as table:
        missing = [c for c in ("DMS_id", "target_seq") if c not in table.header]
        if missing:
            raise DataError(
                f"{table.name}: missing column(s) {', '.join(map(repr, missing))}; is this ProteinGym's "
                f"{REFERENCE_NAME}?"
            )
        index = {h: i for i, h in enumerate(table.header)}
        for loc, values in table.rows:
            if len(values) != len(table.header):
                raise DataError(f"{table.where(loc)}: the row has {len(values)} fields, the header {len(table.header)}")
            dms_id = values[index["DMS_id"]].strip()
            target = values[index["target_seq"]].strip().upper()
            if not dms_id:
                continue
            problem = source_name_problem(dms_id)
            if problem:
                raise DataError(f"{table.where(loc)}: DMS_id {problem}")
            if dms_id in lines:
                raise DataError(
                    f"{table.where(loc)}: DMS_id {dms_id!r} is listed twice (also on line {lines[dms_id]}); which row "
                    "is meant is not guessed: remove one"
                )
            lines[dms_id] = loc
            if not TEMPLATE.fullmatch(target):
                raise DataError(f"{table.where(loc)}: target_seq of {dms_id!r} is not a protein sequence")
            filename = (values[index["DMS_filename"]].strip() if "DMS_filename" in index else "") or f"{dms_id}.csv"
            problem = source_name_problem(filename)
            if problem:
                raise DataError(f"{table.where(loc)}: DMS_filename of {dms_id!r}: {problem.replace('source', 'file')}")
            if f"file:{filename}" in lines:
                raise DataError(
                    f"{table.where(loc)}: DMS_filename {filename!r} of {dms_id!r} is also that of another assay "
                    f"(line {lines[f'file:{filename}']}); which one it holds is not guessed: fix the reference"
                )
            lines[f"file:{filename}"] = loc
            cutoff = None
            if "DMS_binarization_cutoff" in index:
                try:
                    cutoff = float(values[index["DMS_binarization_cutoff"]])
                except ValueError:
                    cutoff = None
                if cutoff is not None and not math.isfinite(cutoff):
                    cutoff = None
            out[dms_id] = Assay(dms_id, filename, target, cutoff)
    if not out:
        raise DataError(f"{REFERENCE_NAME}: no assays listed")
    return out


class _Collection:
    """The tables of a ProteinGym folder or zip, by file name (without folders).

    Two tables of the same name (`a/X.csv`, `b/X.csv`) are not guessed between: opening that name
    is a DataError naming both.
    """

    def __init__(self, path: Path):
        self.path = path
        self.files: dict[str, Opener] = {}
        self._places: dict[str, list[str]] = {}
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.name.lower().endswith(TABLE_SUFFIXES) and not p.name.startswith("._"):
                    self._add(p.name, str(p), lambda p=p, **kw: open_table(p, **kw))
        elif path.is_file():
            try:
                with zipfile.ZipFile(path) as archive:
                    members = zip_tables(archive)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{path}: not a folder or a readable zip archive ({exc})") from None
            for m in sorted(members):
                self._add(Path(m).name, f"{path}:{m}", lambda m=m, **kw: open_table(path, member=m, **kw))
        else:
            raise DataError(f"{path} does not exist; pass the folder or zip of ProteinGym assays")

    def _add(self, name: str, place: str, opener: Opener) -> None:
        places = self._places.setdefault(name, [])
        places.append(place)
        if len(places) == 1:
            self.files[name] = opener
        else:
            self.files[name] = lambda **kw: self._ambiguous(name)

    def _ambiguous(self, name: str):
        first, second = self._places[name][:2]
        raise DataError(
            f"{self.path}: {shorten(name, quote=False)} is there {len(self._places[name])} times ({first} and "
            f"{second}); which one is meant is not guessed: remove the copies"
        )


def import_proteingym(
    path: str | Path,
    db_path: str | Path,
    assays: Iterable[str] = (),
    *,
    reference: str | Path | None = None,
    replace: bool = False,
    on_assay: Callable[[dict], None] | None = None,
) -> ProteinGymResult:
    """Import ProteinGym substitution assays from a folder or zip into `db_path`, one source per assay.

    Each assay (`<DMS_id>.csv`: mutant, mutated_sequence, DMS_score, DMS_score_bin, fold columns) is
    imported in its own transaction as source DMS_id with the template `target_seq` from the reference
    file (`reference`, or DMS_substitutions.csv found in `path`); its `fold_*` columns are kept for
    split.strategy "column". Assays already in the database are skipped unless `replace`, so an
    interrupted import can simply be run again. A failing assay is reported and the others go on;
    `on_assay(entry)` is called after each.
    """
    path, db_path = Path(path), Path(db_path)
    check_db_file(db_path)
    collection = _Collection(path)
    if reference is not None:
        ref_path = Path(reference)
        ref_open = lambda **kw: open_table(ref_path, **kw)  # noqa: E731
        ref_name = str(ref_path)
    elif REFERENCE_NAME in collection.files:
        ref_open = collection.files[REFERENCE_NAME]
        ref_name = f"{path}:{REFERENCE_NAME}"
    else:
        raise UsageError(
            f"{path} has no {REFERENCE_NAME}; pass --reference with ProteinGym's reference file "
            "(reference_files/DMS_substitutions.csv of the ProteinGym release)"
        )
    known = read_reference(ref_open)
    wanted = list(dict.fromkeys(assays))
    by_file = {a.filename: a for a in known.values()}
    present = [by_file[name] for name in collection.files if name in by_file]
    ignored = sorted(n for n in collection.files if n not in by_file and n != REFERENCE_NAME)
    if wanted:
        unknown = [a for a in wanted if a not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"see the DMS_id column of {ref_name}"
            raise UsageError(f"--assay: {unknown[0]!r} is not in {ref_name}; {hint}")
        absent = [a for a in wanted if known[a].filename not in collection.files]
        if absent:
            raise DataError(f"{path}: no file {known[absent[0]].filename} for --assay {absent[0]!r}")
        chosen = [known[a] for a in wanted]
    else:
        chosen = sorted(present, key=lambda a: a.dms_id)
        if not chosen:
            raise DataError(f"{path}: none of its files is an assay listed in {ref_name} (DMS_filename)")
    result = ProteinGymResult(str(db_path), ref_name, ignored_files=ignored)
    with import_lock(db_path):  # the whole run: a concurrent one would see half of it (docs/data.md)
        _import_chosen(chosen, collection, db_path, replace, result, on_assay)
    return result


def _import_chosen(chosen, collection: _Collection, db_path: Path, replace: bool, result, on_assay) -> None:
    existing = _existing_sources(db_path)
    for assay in chosen:
        entry: dict[str, Any] = {"assay": assay.dms_id, "file": assay.filename}
        if assay.dms_id in existing and not replace:
            entry.update(status="skipped", reason="already in the database; --replace re-imports it")
        else:
            try:
                imported = _import_assay(collection.files[assay.filename], db_path, assay, replace)
            except InfraError as exc:
                entry.update(status="failed", error=exc.message)
                log.info("%s: not imported: %s", assay.dms_id, exc.message)  # the caller reports it
            else:
                entry.update(status="imported", **{k: v for k, v in imported.to_dict().items() if k != "db"})
        result.assays.append(entry)
        if on_assay is not None:
            on_assay(entry)


def _import_assay(open_, db_path: Path, assay: Assay, replace: bool) -> ImportResult:
    with open_() as table:
        header = list(table.header)
    folds = [h for h in header if h.startswith(FOLD_PREFIX) and IDENTIFIER.fullmatch(h)]
    has_bin = "DMS_score_bin" in header
    spec = _Spec(
        source=assay.dms_id,
        template=assay.target_seq,
        binarize_cutoff=None if has_bin else assay.cutoff,
        extra_columns=folds,
        template_from=f"target_seq of {assay.dms_id} in {REFERENCE_NAME}",
    )
    return _import_table(open_, db_path, spec, replace)


def _existing_sources(db_path: Path) -> set[str]:
    if not db_path.is_file():
        return set()
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return {r[0] for r in conn.execute("SELECT source_text FROM sources")}
        finally:
            conn.close()
    except sqlite3.Error:
        return set()  # no sources table yet (or not readable): each assay's import reports the problem
