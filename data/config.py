"""Plain dataclass configs for the data package (Hydra schemas in `train/`/`conf/` wrap these).

They are validated on construction so that a bad value fails when the config is built, naming the
field and the value, long before a training step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCE_FORMATS = ("text", "json", "parquet", "disk", "hub")
TEXT_UNITS = ("document", "paragraph", "line")
OVERLONG_POLICIES = ("truncate", "drop")
THINKING_MODES = ("chat", "thinking")


class DataError(ValueError):
    """Bad user data (file:line or field and value in the message); a ValueError for callers."""


def _fail(cls: str, name: str, value: Any, why: str) -> None:
    raise DataError(f"{cls}.{name}={value!r}: {why}")


@dataclass
class SourceConfig:
    """One corpus in a mixture.

    `path` is a local file, a glob (`data/*.jsonl`), a directory written by
    `datasets.Dataset.save_to_disk`, or anything `datasets.load_dataset` accepts (a hub name, a
    builder name). `format` is inferred from the path when None.
    """

    path: str
    weight: float = 1.0
    column: str = "text"  # the field holding each document's text
    format: str | None = None  # one of SOURCE_FORMATS; None = infer from `path`
    split: str = "train"  # for `disk` (DatasetDict) and `hub` sources
    name: str | None = None  # dataset config name for `hub` sources
    text_unit: str = "document"  # for .txt files: a whole file, a paragraph or a line per doc

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            _fail("SourceConfig", "path", self.path, "must be a non-empty string")
        if not float(self.weight) > 0:
            _fail("SourceConfig", "weight", self.weight, "must be > 0")
        self.weight = float(self.weight)
        if self.format is not None and self.format not in SOURCE_FORMATS:
            _fail("SourceConfig", "format", self.format, f"choose one of {SOURCE_FORMATS}")
        if self.text_unit not in TEXT_UNITS:
            _fail("SourceConfig", "text_unit", self.text_unit, f"choose one of {TEXT_UNITS}")
        if not self.column:
            _fail("SourceConfig", "column", self.column, "must name a field")


def _as_sources(items: list) -> list[SourceConfig]:
    return [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in items]


@dataclass
class DataConfig:
    """Pretraining data.

    Empty `sources` means the default corpus (Python standard library sources, built by
    `data.prepare`), with its own path-hash validation split. With user sources, validation comes
    from `val_sources` if given, else `val_fraction` of each source's documents (chosen by a stable
    hash of the document text) is held out of training.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    val_fraction: float = 0.01
    tokenizer: str | None = None  # tokenizer.json (or its dir); None = the default trained one
    vocab_size: int = 8192  # size of the default trained tokenizer (fits the `tiny` preset)
    default_max_files: int | None = None  # default corpus from the first N stdlib files only
    cache_dir: str | None = None  # None = $V4LAB_CACHE or ~/.cache/v4lab
    prefetch: int = 8  # batches prepared ahead by the background worker (0 = synchronous)
    tokenize_batch: int = 1024  # documents per `encode_batch` call while tokenising
    progress: bool = True

    def __post_init__(self) -> None:
        self.sources = _as_sources(self.sources)
        self.val_sources = _as_sources(self.val_sources)
        if not 0.0 <= float(self.val_fraction) < 1.0:
            _fail("DataConfig", "val_fraction", self.val_fraction, "must be in [0, 1)")
        if int(self.vocab_size) <= 0:
            _fail("DataConfig", "vocab_size", self.vocab_size, "must be positive")
        if int(self.prefetch) < 0:
            _fail("DataConfig", "prefetch", self.prefetch, "must be >= 0")
        if int(self.tokenize_batch) <= 0:
            _fail("DataConfig", "tokenize_batch", self.tokenize_batch, "must be positive")


@dataclass
class SFTConfig:
    """Supervised fine-tuning data: JSONL files of OpenAI-style conversations.

    Each line holds `messages` and optionally `tools`, `thinking_mode` ("chat"/"thinking"; the
    default below applies when absent) and `domain` (counted in the stats). `sources` give paths
    or globs with mixture weights (`column` and `format` are ignored). Conversations longer than the
    packing length are cut to it (`overlong="truncate"`) or skipped (`"drop"`); either way the count
    is reported.
    """

    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)
    val_fraction: float = 0.0
    tokenizer: str | None = None
    overlong: str = "truncate"
    default_thinking_mode: str = "chat"
    drop_thinking: bool = True
    pack_buffer: int = 1024  # conversations per best-fit packing group
    cache_dir: str | None = None
    prefetch: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        self.sources = _as_sources(self.sources)
        self.val_sources = _as_sources(self.val_sources)
        if not self.sources:
            _fail("SFTConfig", "sources", self.sources, "give at least one JSONL path")
        if self.overlong not in OVERLONG_POLICIES:
            _fail("SFTConfig", "overlong", self.overlong, f"choose one of {OVERLONG_POLICIES}")
        if self.default_thinking_mode not in THINKING_MODES:
            _fail("SFTConfig", "default_thinking_mode", self.default_thinking_mode,
                  f"choose one of {THINKING_MODES}")
        if not 0.0 <= float(self.val_fraction) < 1.0:
            _fail("SFTConfig", "val_fraction", self.val_fraction, "must be in [0, 1)")
        if int(self.pack_buffer) <= 0:
            _fail("SFTConfig", "pack_buffer", self.pack_buffer, "must be positive")
        if int(self.prefetch) < 0:
            _fail("SFTConfig", "prefetch", self.prefetch, "must be >= 0")
