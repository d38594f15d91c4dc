"""Reading every supported source kind, and located errors for bad input."""

from __future__ import annotations

import json

import pytest

from data.config import DataConfig, SourceConfig
from data.pretrain import build_pretrain_data
from data.sources import iter_documents, resolve_source
from tests.data._util import make_docs, write_jsonl


def read_all(src: SourceConfig) -> list[str]:
    return [d for batch in iter_documents(resolve_source(src), 3) for d in batch]


def test_jsonl_glob_in_sorted_order_with_custom_column(tmp_path):
    a, b = make_docs(4, 1), make_docs(5, 2)
    write_jsonl(tmp_path / "b.jsonl", b, column="content")
    write_jsonl(tmp_path / "a.jsonl", a, column="content")
    assert read_all(SourceConfig(str(tmp_path / "*.jsonl"), column="content")) == a + b


def test_json_array_parquet_text_and_saved_dataset(tmp_path):
    import datasets

    docs = make_docs(7, 3)
    (tmp_path / "arr.json").write_text(json.dumps([{"text": d} for d in docs]))
    assert read_all(SourceConfig(str(tmp_path / "arr.json"))) == docs

    datasets.Dataset.from_dict({"text": docs, "n": list(range(7))}).to_parquet(
        str(tmp_path / "p.parquet"))
    assert read_all(SourceConfig(str(tmp_path / "p.parquet"))) == docs

    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    src = SourceConfig(str(tmp_path / "saved"), column="body")
    assert resolve_source(src).format == "disk"
    assert read_all(src) == docs

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "1.txt").write_text("first file\nline two\n\nsecond para\n")
    (tmp_path / "t" / "2.txt").write_text("other file\n")
    whole = read_all(SourceConfig(str(tmp_path / "t")))
    assert whole == ["first file\nline two\n\nsecond para\n", "other file\n"]
    lines = read_all(SourceConfig(str(tmp_path / "t" / "*.txt"), text_unit="line"))
    assert lines == ["first file", "line two", "", "second para", "other file"]


def test_hub_names_are_not_treated_as_local_files(tmp_path):
    assert resolve_source(SourceConfig("HuggingFaceFW/fineweb-edu")).format == "hub"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        resolve_source(SourceConfig(str(tmp_path / "missing.jsonl")))


def test_malformed_jsonl_line_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:4: malformed JSON"):
        read_all(SourceConfig(str(p)))


def test_missing_text_field_named_with_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"title": "no text here"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:4: text field 'text' is missing"):
        read_all(SourceConfig(str(p)))
    q = tmp_path / "n.jsonl"
    q.write_text('{"text": "a"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r"n\.jsonl:2: text field 'text' is a int"):
        read_all(SourceConfig(str(q)))


def test_missing_column_named_with_available_ones(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", ["a", "b"], column="body")
    with pytest.raises(ValueError, match=r"no column 'text'; available columns: \['body'\]"):
        read_all(SourceConfig(str(p)))


@pytest.mark.parametrize("case", ["empty_file", "empty_docs", "no_match"])
def test_empty_source_raises_before_training(tmp_path, tok, case):
    if case == "empty_file":
        (tmp_path / "e.jsonl").write_text("")
        path, match = str(tmp_path / "e.jsonl"), "empty source"
    elif case == "empty_docs":
        write_jsonl(tmp_path / "e.jsonl", ["", ""])
        path, match = str(tmp_path / "e.jsonl"), r"empty source \(no non-empty document; 2 empty"
    else:
        path, match = str(tmp_path / "none-*.jsonl"), "no files match"
    cfg = DataConfig(sources=[SourceConfig(path)], cache_dir=str(tmp_path / "cache"),
                     progress=False)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as info:
        build_pretrain_data(cfg, tok, seq_len=64, micro_batch=2)
    assert path.split("/")[-1] in str(info.value)
    shards = tmp_path / "cache" / "tokens"
    assert not shards.exists() or not any(shards.iterdir())  # nothing half-written


def test_config_validation_names_field():
    with pytest.raises(ValueError, match=r"SourceConfig.weight=0"):
        SourceConfig("x.jsonl", weight=0)
    with pytest.raises(ValueError, match=r"DataConfig.val_fraction=1.5"):
        DataConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match=r"SourceConfig.text_unit='word'"):
        DataConfig(sources=[{"path": "x.txt", "text_unit": "word"}])
