"""Data files whose text is not UTF-8 stop in one line naming the file, the record and the byte."""

import pytest
from conftest import demo_argv, recipe_stop_message

from sftmix_trl.commands import sft as sft_recipe
from sftmix_trl.data.load import DataError, DataSource, load_source

GOOD = b'{"instruction": "Name a colour.", "output": "Blue."}\n'
LATIN1 = '{"instruction": "Caf\xe9 or tea?", "output": "Tea."}\n'.encode("latin-1")  # one 0xE9 byte


def test_jsonl_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD + LATIN1)
    with pytest.raises(DataError) as error:
        load_source(DataSource(str(path)))
    offset = len(GOOD) + LATIN1.index(b"\xe9")
    assert str(error.value) == (
        f"{path}, line 2 (byte {offset}): not valid UTF-8 (byte(s) e9: invalid continuation byte); save the file as "
        "UTF-8"
    )


def test_json_array_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "latin1.json"
    data = b"[\n" + GOOD.strip() + b",\n" + LATIN1.strip() + b"\n]"
    path.write_bytes(data)
    offset = data.index(LATIN1[LATIN1.index(b"Caf") + 3 :][:1])
    with pytest.raises(DataError, match=rf"latin1\.json, line 3 \(byte {offset}\): not valid UTF-8"):
        load_source(DataSource(str(path)))


def test_recipe_on_a_non_utf8_file_stops_in_one_line_before_writing(tiny_model, tmp_path, monkeypatch):
    (tmp_path / "latin1.jsonl").write_bytes(GOOD + LATIN1)
    out = tmp_path / "out"
    argv = demo_argv(
        "sft", tiny_model, out, "--dataset_name", str(tmp_path / "latin1.jsonl"), "--dataset_mixture", "null"
    )
    text = recipe_stop_message(sft_recipe.main, sft_recipe.ARGUMENTS, argv, monkeypatch)
    assert text.startswith("error: ") and "\n" not in text and "latin1.jsonl, line 2" in text and "UTF-8" in text
    assert not out.exists()


def test_parquet_with_a_text_field_that_is_not_utf8_names_the_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def text(values):  # Arrow strings that skip UTF-8 validation, as some writers produce them
        return pa.array(values, type=pa.binary()).view(pa.string())

    rows = [b"fine question", b"Caf\xe9 or tea?", b"another"]
    path = tmp_path / "latin1.parquet"
    pq.write_table(pa.table({"instruction": text(rows), "output": text([b"a", b"b", b"c"])}), path)
    with pytest.raises(DataError) as error:
        load_source(DataSource(str(path)))
    assert (
        str(error.value)
        == f"{path}, record 1: a text field is not valid UTF-8 (byte(s) e9: invalid continuation byte)"
    )
