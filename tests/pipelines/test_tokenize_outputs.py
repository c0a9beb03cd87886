"""The output directory as a whole (pipelines/tokenize/outputs.py)."""

from __future__ import annotations

import pytest

import tok_data as td
from pipelines.errors import UserError
from pipelines.tokenize.outputs import OutputDir
from pipelines.tokenize.tokenizer_info import tokenizer_metadata


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)


def test_output_dir_refuses_another_tokenizer(tmp_path, tok_dir):
    other = tmp_path / "other"
    td.save_tokenizer(other, seed=1)
    meta_a, meta_b = tokenizer_metadata(tok_dir), tokenizer_metadata(str(other))
    assert meta_a.tokenizer_sha256 != meta_b.tokenizer_sha256
    out = OutputDir(str(tmp_path / "out"))
    out.prepare(meta_a, ["cls"], overwrite=False)
    out.prepare(meta_a, ["cls"], overwrite=False)       # same settings: fine
    with pytest.raises(UserError, match="different tokenizer_sha256"):
        OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=False)
    with pytest.raises(UserError, match="keep_fields"):
        OutputDir(str(tmp_path / "out")).prepare(meta_a, [], overwrite=False)
    (tmp_path / "out" / "x.parquet").write_bytes(b"old")
    OutputDir(str(tmp_path / "out")).prepare(meta_b, ["cls"], overwrite=True)
    assert not (tmp_path / "out" / "x.parquet").exists()
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="without a vqtok run record"):
        OutputDir(str(stranger)).prepare(meta_a, [], overwrite=False)


def test_an_output_that_is_a_file_or_cannot_be_written_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^--output .*/file is a file, not a directory$"):
        OutputDir(str(tmp_path / "file")).check_location()
    with pytest.raises(UserError, match=r"^--output .*/file/out: cannot write \(.*Not a directory"):
        OutputDir(str(tmp_path / "file" / "out")).check_location()
    OutputDir(str(tmp_path / "new" / "out")).check_location()
    assert (tmp_path / "new" / "out").is_dir()
