"""Reading documents from a source: local text/JSON(L)/Parquet files and globs, a `save_to_disk`
directory, or anything `datasets.load_dataset` accepts.

Reading goes through `datasets` in streaming mode, so a terabyte corpus is read once, file by
file, without first being converted into an Arrow cache. `datasets` reports a bad record without a
usable location, so on any read error, and on a record without a text field, we re-scan the local
files ourselves to name the exact file and line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from data.cache import file_fingerprint
from data.config import DataError, SourceConfig

_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_EXT_FORMAT = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
               ".ndjson": "json", ".parquet": "parquet"}


@dataclass
class ResolvedSource:
    """A source with its format decided and its globs expanded (sorted, so order is stable)."""

    config: SourceConfig
    format: str
    files: list[str]  # local files for text/json/parquet, empty for disk/hub

    @property
    def label(self) -> str:
        return self.config.path

    @property
    def column(self) -> str:
        # The `text` builder always names its column "text", whatever the config says.
        return "text" if self.format == "text" else self.config.column

    def descriptor(self) -> dict[str, Any]:
        """What identifies this source's content, for the token-cache key."""
        c = self.config
        d: dict[str, Any] = {"format": self.format, "column": self.column}
        if self.format == "text":
            d["text_unit"] = c.text_unit
        if self.files:
            d["files"] = [file_fingerprint(f) for f in self.files]
        elif self.format == "disk":
            root = Path(c.path)
            d["path"] = os.path.realpath(c.path)
            d["split"] = c.split
            d["files"] = [file_fingerprint(p) for p in sorted(root.rglob("*")) if p.is_file()]
        else:  # hub: the name is the identity; revisions are the user's business
            d.update(path=c.path, name=c.name, split=c.split)
        return d


def _format_of_file(path: str) -> str | None:
    name = path.lower()
    for comp in _COMPRESSION:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return _EXT_FORMAT.get(os.path.splitext(name)[1])


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                "dataset_dict.json"))


def resolve_source(src: SourceConfig) -> ResolvedSource:
    """Decides the format and expands globs. Raises if a local path matches nothing."""
    path = src.path
    if src.format in ("disk", "hub"):
        return ResolvedSource(src, src.format, [])
    p = Path(path).expanduser()
    if p.is_dir():
        if _is_saved_dataset(p):
            return ResolvedSource(src, "disk", [])
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and _format_of_file(str(f)))
    elif glob.has_magic(path):
        files = sorted(f for f in glob.glob(os.path.expanduser(path), recursive=True)
                       if os.path.isfile(f))
    elif p.is_file():
        files = [str(p)]
    elif src.format is None and not path.startswith((".", "/", "~")) and not Path(path).suffix:
        return ResolvedSource(src, "hub", [])  # e.g. "HuggingFaceFW/fineweb-edu"
    else:
        raise FileNotFoundError(f"source {path!r}: no such file or directory (for a dataset "
                                f"name that `datasets.load_dataset` knows, set format='hub')")
    if not files:
        raise FileNotFoundError(f"source {path!r}: no files match")
    fmt = src.format
    if fmt is None:
        kinds = {_format_of_file(f) for f in files}
        if None in kinds or len(kinds) != 1:
            raise DataError(f"source {path!r}: cannot infer one format from the extensions of "
                             f"{files[:5]}; set SourceConfig.format to one of text/json/parquet")
        fmt = kinds.pop()
    return ResolvedSource(src, fmt, files)


# ---------------------------------------------------------------------- reading
def _open_dataset(rs: ResolvedSource):
    import datasets

    c = rs.config
    if rs.format == "disk":
        ds = datasets.load_from_disk(c.path)
        if isinstance(ds, datasets.DatasetDict):
            if c.split not in ds:
                raise DataError(f"source {c.path!r}: split {c.split!r} not found; available "
                                 f"splits: {sorted(ds)}")
            ds = ds[c.split]
        return ds
    if rs.format == "hub":
        return datasets.load_dataset(c.path, c.name, split=c.split, streaming=True)
    files = [f for f in rs.files if os.path.getsize(f) > 0]  # `datasets` chokes on empty files
    if not files:
        raise DataError(f"source {c.path!r}: empty source (every file is empty: {rs.files[:5]})")
    kwargs: dict[str, Any] = {}
    if rs.format == "text":
        kwargs["sample_by"] = c.text_unit
    return datasets.load_dataset(rs.format, data_files=files, split="train", streaming=True,
                                 **kwargs)


def iter_documents(rs: ResolvedSource, batch_size: int) -> Iterator[list[str]]:
    """Yields the source's documents as lists of strings, in a stable order.

    Raises ValueError naming file:line for a malformed record or a record whose text field is
    missing or not a string, and naming the column (with the ones that exist) if no record has it.
    """
    col = rs.column
    row = 0
    try:
        ds = _open_dataset(rs)
        for batch in ds.iter(batch_size=batch_size):
            if col not in batch:
                raise DataError(f"source {rs.label!r}: no column {col!r}; available columns: "
                                 f"{sorted(batch)} (set SourceConfig.column)")
            texts = batch[col]
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    what = "missing" if t is None else f"a {type(t).__name__}, not a string"
                    raise DataError(f"{locate_row(rs, row + i)}: text field {col!r} is {what}")
            row += len(texts)
            yield texts
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - translate any reader failure into a located error
        where = find_malformed_record(rs)
        if where is not None:
            raise DataError(where) from e
        raise DataError(f"source {rs.label!r}: failed to read after {row} documents: "
                         f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------- error location
def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def decode_line(path: str, lineno: int, raw: bytes) -> str:
    """One line of a UTF-8 file as text, or a DataError naming the file, line, column and byte
    (a corpus with one stray Latin-1 byte should say where it is, not `position 5290`)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); re-encode the file as UTF-8") from None


def first_undecodable_line(path: str) -> str | None:
    """`decode_line`'s message for the first line of `path` that is not UTF-8, or None."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                decode_line(path, lineno, raw)
            except DataError as e:
                return str(e)
    return None


def _is_json_array(path: str) -> bool:
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def find_malformed_record(rs: ResolvedSource) -> str | None:
    """'file:line: ...' for the first line of a local text or JSON(L) source that is not UTF-8,
    or the first unparsable JSON record; None if there is none (or the source is not local)."""
    if rs.format not in ("json", "text"):
        return None
    for path in rs.files:
        if path.endswith(_COMPRESSION) and not path.endswith(".gz"):
            return None
        undecodable = first_undecodable_line(path)
        if undecodable is not None:
            return undecodable
        if rs.format != "json":
            continue
        if _is_json_array(path):
            try:
                with _open_text(path) as f:
                    json.load(f)
            except json.JSONDecodeError as e:
                return f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
            continue
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})"
                if not isinstance(rec, dict):
                    return f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
    return None


def locate_row(rs: ResolvedSource, row: int) -> str:
    """Turns a 0-based document index into 'file:line' (JSONL), 'file: record N' (other local
    formats) or 'source: row N'."""
    if rs.format == "json":
        seen = 0
        for path in rs.files:
            if os.path.getsize(path) == 0:
                continue
            if _is_json_array(path):
                with _open_text(path) as f:
                    n = len(json.load(f))
                if row < seen + n:
                    return f"{path}: record {row - seen}"
                seen += n
                continue
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        if seen == row:
                            return f"{path}:{lineno}"
                        seen += 1
    if rs.format == "parquet":
        import pyarrow.parquet as pq

        seen = 0
        for path in rs.files:
            n = pq.ParquetFile(path).metadata.num_rows
            if row < seen + n:
                return f"{path}: row {row - seen}"
            seen += n
    return f"source {rs.label!r}: document {row}"
