"""`list_shards` (pipelines/shards/urls.py): shard names that would make outputs no reader reads
are refused before anything runs."""
from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.shards.urls import list_shards


def touch(path) -> None:
    open(path, "wb").close()


def test_hidden_shard_names_are_refused_naming_the_inputs(tmp_path):
    for name in ("train-000000.tar", "_x.tar", ".y.tar"):
        touch(tmp_path / name)
    with pytest.raises(UserError) as e:
        list_shards([str(tmp_path)])
    message = str(e.value)
    assert message.startswith("2 input shard(s) cannot be tokenized under their names: ")
    assert f"{tmp_path}/.y.tar (starts with '_' or '.': readers skip such files)" in message
    assert f"{tmp_path}/_x.tar (starts with" in message
    assert message.endswith("rename them (a name that does not start with '_' or '.', in UTF-8)")
    assert list_shards([str(tmp_path / "train-*.tar")]) == [(str(tmp_path / "train-000000.tar"), "train-000000")]


def test_many_refused_names_are_counted_not_all_listed(tmp_path):
    for i in range(8):
        touch(tmp_path / f"_s{i}.tar")
    with pytest.raises(UserError, match=r"^8 input shard\(s\) .*_s4\.tar \(starts with [^)]*\) and 3 more; rename"):
        list_shards([str(tmp_path / "_s*.tar")])


def test_a_shard_name_that_is_not_utf8_is_refused_printably(tmp_path):
    touch(os.fsencode(str(tmp_path)) + b"/caf\xe9.tar")           # Python lists it as 'caf\udce9.tar'
    with pytest.raises(UserError) as e:
        list_shards([str(tmp_path)])
    message = str(e.value)
    assert f"{tmp_path}/caf\\udce9.tar (not valid UTF-8: cannot be stored in the shard column)" in message
    message.encode("utf-8")                                       # printable: no lone surrogate in it


def test_tokenize_refuses_them_before_starting_anything(tmp_path):
    touch(tmp_path / "_x.tar")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "tok"), "--input",
                                       str(tmp_path / "_x.tar"), "--output", str(out), "--no-progress"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == (f"Error: 1 input shard(s) cannot be tokenized under their names: "
                                     f"{tmp_path}/_x.tar (starts with '_' or '.': readers skip such files); "
                                     "rename them (a name that does not start with '_' or '.', in UTF-8)")
    assert not out.exists()
