"""`verify_output`: a clean output made by the real `vqtok tokenize` passes; each kind of damage
is one finding naming the file and the cause."""
from __future__ import annotations

import glob
import gzip
import json
import os
import shutil

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from fsspec.implementations.local import LocalFileSystem

from pipelines import verify
from pipelines.cli import main
from pipelines.errors import UserError
from pipelines.verify import format_report, verify_output


@pytest.fixture
def out(tokenized_output, tmp_path):
    """A private copy of the clean output."""
    path = str(tmp_path / "out")
    shutil.copytree(tokenized_output["output"], path)
    return path


def causes(report: dict, name: str) -> list[str]:
    """The causes of the findings about the file `name` (a path relative to the output)."""
    return [f["cause"] for f in report["findings"] if f["path"].endswith("/" + name)]


def rewrite(path: str, change) -> None:
    """Rewrite a data file as valid Parquet (schema metadata kept) with change(table) -> table."""
    table = pq.read_table(path)
    pq.write_table(change(table), path, compression="zstd")


def with_codes(table: pa.Table, row: int, position: int, value: int) -> pa.Table:
    codes = table.column("codes").to_pylist()
    codes[row][position] = value
    return table.set_column(table.schema.get_field_index("codes"), table.schema.field("codes"),
                            pa.array(codes, type=table.schema.field("codes").type))


def test_clean_output_passes_with_every_check(out, tokenized_output):
    report = verify_output(out, tokenized_output["inputs"])
    assert report["findings"] == [] and report["ok"]
    assert report["shards"] == 4 and report["data_files"] == 4 and report["rows"] == 62
    assert report["checksums_checked"] == 4 and report["unchecked_files"] == 0
    manifest = json.load(open(f"{out}/_manifest/bad-000000.json"))
    assert manifest["files"]["errors"]["bytes"] == os.path.getsize(f"{out}/_errors/bad-000000.parquet")
    assert manifest["files"]["data"]["bytes"] == os.path.getsize(f"{out}/bad-000000.parquet")
    assert format_report(report).startswith(f"OK {out}: 4 shards, 4 data files, 62 rows")


def test_deleted_parquet(out):
    os.remove(f"{out}/train-000001.parquet")
    report = verify_output(out)
    assert not report["ok"]
    assert causes(report, "train-000001.parquet") == ["missing: its manifest says the shard was committed"]
    assert len(report["findings"]) == 1


def test_truncated_parquet(out):
    path = f"{out}/train-000002.parquet"
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    found = causes(verify_output(out), "train-000002.parquet")
    assert found[0] == f"{len(data) // 2} bytes, {len(data)} were committed (truncated or replaced)"
    assert any(c.startswith("not a readable Parquet file") for c in found)


def test_altered_bytes_same_size(out):
    path = f"{out}/train-000000.parquet"
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(path, "wb").write(bytes(data))
    found = causes(verify_output(out), "train-000000.parquet")
    assert "sha256 differs from the one recorded at commit (altered)" in found


def test_rewritten_as_valid_parquet_with_a_changed_code(out):
    path = f"{out}/train-000001.parquet"
    rewrite(path, lambda t: with_codes(t, 3, 5, (t.column("codes")[3][5].as_py() + 1) % 64))
    found = causes(verify_output(out), "train-000001.parquet")
    assert found and all("committed" in c or "altered" in c for c in found), found   # checksum only


def test_codes_out_of_range(out):
    rewrite(f"{out}/train-000000.parquet", lambda t: with_codes(t, 0, 0, 64))
    found = causes(verify_output(out), "train-000000.parquet")
    assert "codes outside [0, 64) (1 values, e.g. 64)" in found


def test_duplicate_key(out):
    rewrite(f"{out}/train-000002.parquet", lambda t: pa.concat_tables([t, t.slice(7, 1)]))
    found = causes(verify_output(out), "train-000002.parquet")
    assert "1 duplicate key(s), e.g. 's2-000047'" in found
    assert "21 rows, its manifest committed 20" in found


def test_missing_input_shard(out, tokenized_output):
    d = tokenized_output["dir"]
    report = verify_output(out, [f"{d}/train-{{000000..000003}}.tar", f"{d}/bad-000000.tar"])
    assert [f["path"] for f in report["findings"]] == [f"{d}/train-000003.tar"]
    assert report["findings"][0]["cause"].startswith("input shard not accounted for")
    assert verify_output(out, tokenized_output["inputs"])["ok"]


def test_one_tokenizer(out):
    path = f"{out}/_manifest/train-000001.json"
    manifest = json.load(open(path))
    manifest["tokenizer_sha256"] = "0" * 64
    json.dump(manifest, open(path, "w"))
    found = causes(verify_output(out), "_manifest/train-000001.json")
    assert len(found) == 1 and found[0].startswith("names tokenizer 000000000000...")


def test_uncommitted_and_failed_shards(out):
    os.remove(f"{out}/_manifest/train-000000.json")          # data without its commit marker
    os.remove(f"{out}/_manifest/bad-000000.json")            # errors without a manifest
    os.remove(f"{out}/bad-000000.parquet")
    os.remove(f"{out}/_SUCCESS")
    report = verify_output(out)
    assert causes(report, "train-000000.parquet")[0].startswith("no manifest: the shard was not committed")
    assert causes(report, "_errors/bad-000000.parquet")[0].startswith("a failed shard")
    assert causes(report, "_SUCCESS")[0].startswith("missing: the job did not finish")
    assert len(report["findings"]) == 3


def test_only_a_manifest_directly_in_the_manifest_folder_commits_a_shard(out):
    """A shard is committed by OUTPUT/_manifest/<shard>.json, the one rule resume, inspect and
    verify share: a copy of a manifest in a subfolder commits nothing."""
    os.makedirs(f"{out}/_manifest/old")
    shutil.move(f"{out}/_manifest/train-000000.json", f"{out}/_manifest/old/train-000000.json")
    report = verify_output(out)
    assert causes(report, "train-000000.parquet")[0].startswith("no manifest: the shard was not committed")
    assert report["shards"] == 3


def test_errors_file_checked_against_its_manifest(out):
    os.remove(f"{out}/_errors/bad-000000.parquet")
    assert causes(verify_output(out), "_errors/bad-000000.parquet") == ["missing: its manifest counts 1 errors"]


def test_output_without_recorded_checksums_is_checked_otherwise(out):
    for path in glob.glob(f"{out}/_manifest/*.json"):
        manifest = json.load(open(path))
        del manifest["files"]
        json.dump(manifest, open(path, "w"))
    report = verify_output(out)
    assert report["ok"] and report["unchecked_files"] == 4 and report["checksums_checked"] == 0
    rewrite(f"{out}/train-000000.parquet", lambda t: with_codes(t, 0, 0, 99))
    assert "codes outside [0, 64) (1 values, e.g. 99)" in causes(verify_output(out), "train-000000.parquet")


def test_keys_across_shards_only_when_asked(out):
    keys = pq.read_table(f"{out}/train-000000.parquet").column("key")
    rewrite(f"{out}/train-000001.parquet",
            lambda t: t.set_column(t.schema.get_field_index("key"), "key", keys))
    assert not any("also in shard" in f["cause"] for f in verify_output(out)["findings"])
    found = causes(verify_output(out, unique_keys=True), "train-000001.parquet")
    assert "key 's0-000000' is also in shard train-000000" in found


def test_not_an_output_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such tokenize output directory"):
        verify_output(str(tmp_path / "nope"))


def test_output_on_s3(tokenized_output, s3_env):
    import s3fs

    fs = s3fs.S3FileSystem()
    if not fs.exists("vqtok-verify"):
        fs.mkdir("vqtok-verify")
    fs.put(tokenized_output["output"] + "/", "vqtok-verify/out/", recursive=True)
    report = verify_output("s3://vqtok-verify/out")
    assert report["ok"] and report["rows"] == 62 and report["checksums_checked"] == 4, report["findings"]
    fs.rm("vqtok-verify/out/train-000001.parquet")
    fs.pipe("vqtok-verify/out/train-000002.parquet", b"PAR1 not really")
    report = verify_output("s3://vqtok-verify/out")
    assert [f["path"] for f in report["findings"]] == ["s3://vqtok-verify/out/train-000001.parquet",
                                                      "s3://vqtok-verify/out/train-000002.parquet",
                                                      "s3://vqtok-verify/out/train-000002.parquet"]


def test_files_readers_would_read_besides_the_committed_shards(out, tokenized_output):
    os.makedirs(f"{out}/sub")
    shutil.copy(f"{out}/train-000000.parquet", f"{out}/sub/train-000000.parquet")
    assert ds.dataset(out, format="parquet").count_rows() == 62 + 20     # pyarrow reads the copy too
    report = verify_output(out, tokenized_output["inputs"], unique_keys=True)
    assert [f["path"] for f in report["findings"]] == [f"{out}/sub/train-000000.parquet"]
    assert report["findings"][0]["cause"].startswith("not a committed shard: readers of the output")
    assert report["rows"] == 62 and report["data_files"] == 4          # the committed shard is still checked

    shutil.rmtree(f"{out}/sub")
    open(f"{out}/notes.txt", "w").write("what this run was\n")
    with pytest.raises(pa.ArrowInvalid):
        ds.dataset(out, format="parquet").to_table()
    for hidden in (".notes.txt", "_tmp/x.parquet", "sub/.x.parquet", "_scratch/sub/y.txt"):   # readers skip these
        os.makedirs(os.path.dirname(f"{out}/{hidden}"), exist_ok=True)
        open(f"{out}/{hidden}", "w").write("x")
    report = verify_output(out)
    assert [f["path"] for f in report["findings"]] == [f"{out}/notes.txt"]
    assert report["findings"][0]["cause"].startswith("stray file: pyarrow.dataset and pandas read every file")


def write_index(out: str, shards) -> None:
    sha = json.load(open(f"{out}/_vqtok.json"))["tokenizer_sha256"]
    index = {"version": 1, "tokenizer_sha256": sha, "shards": {s: {} for s in shards}}
    open(f"{out}/_manifest/_index.json.gz", "wb").write(gzip.compress(json.dumps(index).encode()))


def test_a_removed_shard_is_found_from_success_and_named_by_the_index(out):
    summary = json.load(open(f"{out}/_SUCCESS"))
    json.dump({**summary, "shards": 3, "done": 3}, open(f"{out}/_SUCCESS", "w"))
    assert verify_output(out)["ok"]     # a later job over fewer inputs: more manifests than "done" is fine
    json.dump(summary, open(f"{out}/_SUCCESS", "w"))
    for name in ("train-000001.parquet", "_manifest/train-000001.json"):
        os.remove(f"{out}/{name}")
    report = verify_output(out)
    assert report["findings"] == [{"path": f"{out}/_SUCCESS", "cause": (
        "1 committed shard(s) are gone (_SUCCESS counts 4 finished, 3 have a manifest; missing: "
        "train-000001, named by _manifest/_index.json.gz); rerun the same `vqtok tokenize` to redo them")}]

    data = bytearray(open(f"{out}/_manifest/_index.json.gz", "rb").read())
    data[12] ^= 0xFF                                          # a damaged index (zlib.error) names none
    open(f"{out}/_manifest/_index.json.gz", "wb").write(bytes(data))
    assert causes(verify_output(out), "_SUCCESS") == [
        "1 committed shard(s) are gone (_SUCCESS counts 4 finished, 3 have a manifest; no manifest index "
        "names them: pass --input to find them); rerun the same `vqtok tokenize` to redo them"]

    write_index(out, ["train-000000", "train-000002", "bad-000000"] + [f"gone-{i:02d}" for i in range(7)])
    assert causes(verify_output(out), "_SUCCESS") == [
        "7 committed shard(s) are gone (_SUCCESS counts 4 finished, 3 have a manifest; missing: gone-00, "
        "gone-01, gone-02, gone-03, gone-04 and 2 more, named by _manifest/_index.json.gz); rerun the same "
        "`vqtok tokenize` to redo them"]


def as_json(value) -> bytes:
    return json.dumps(value).encode()


MALFORMED = {   # id: (file, change(parsed JSON) -> new bytes, the finding's cause starts with)
    "manifest-a-list": ("_manifest/train-000001.json", lambda m: as_json([m]),
                        "malformed manifest: must be a JSON object, not list"),
    "manifest-counts-string": ("_manifest/train-000001.json", lambda m: as_json({**m, "counts": "20"}),
                               "malformed manifest: 'counts' must be an object with 'ok', not '20'"),
    "manifest-ok-float": ("_manifest/train-000001.json",
                          lambda m: as_json({**m, "counts": {**m["counts"], "ok": 20.5}}),
                          "malformed manifest: 'counts.ok' must be a non-negative integer, not 20.5"),
    "manifest-failed-string": ("_manifest/bad-000000.json",
                               lambda m: as_json({**m, "counts": {**m["counts"], "failed": "1"}}),
                               "malformed manifest: 'counts.failed' must be a non-negative integer"),
    "manifest-files-list": ("_manifest/train-000001.json", lambda m: as_json({**m, "files": []}),
                            "malformed manifest: 'files' must be an object, not []"),
    "manifest-bytes-string": ("_manifest/train-000001.json",
                              lambda m: as_json({**m, "files": {"data": {**m["files"]["data"], "bytes": "9"}}}),
                              "malformed manifest: 'files.data' must be"),
    "manifest-tokenizer-number": ("_manifest/train-000001.json",
                                  lambda m: as_json({**m, "tokenizer_sha256": 7}),
                                  "malformed manifest: 'tokenizer_sha256' must be a string"),
    "run-grid-int": ("_vqtok.json", lambda r: as_json({**r, "grid": 5}),
                     "malformed run record: 'grid' must be a list of two positive integers, not 5"),
    "run-codebook-string": ("_vqtok.json", lambda r: as_json({**r, "codebook_size": "x"}),
                            "malformed run record: 'codebook_size' must be an integer >= 2, not 'x'"),
    "run-tokenizer-list": ("_vqtok.json", lambda r: as_json({**r, "tokenizer_sha256": ["a"]}),
                           "malformed run record: 'tokenizer_sha256' must be a non-empty string"),
    "run-a-list": ("_vqtok.json", lambda r: as_json([r]), "malformed run record: must be a JSON object"),
    "success-not-json": ("_SUCCESS", lambda s: b"done\n", "unreadable job summary ("),
    "success-not-utf8": ("_SUCCESS", lambda s: b"\xff\xfe", "unreadable job summary ("),
    "success-a-list": ("_SUCCESS", lambda s: as_json([s]), "malformed job summary: must be a JSON object"),
    "success-done-string": ("_SUCCESS", lambda s: as_json({**s, "done": "4"}),
                            "malformed job summary: 'done' must be the number of finished shards, not '4'"),
}


@pytest.mark.parametrize("name,change,cause", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_json_files_are_findings_not_tracebacks(out, name, change, cause):
    path = f"{out}/{name}"
    changed = change(json.load(open(path)))
    open(path, "wb").write(changed)
    report = verify_output(out)
    assert not report["ok"]
    found = causes(report, name)
    assert len(found) == 1 and found[0].startswith(cause), found
    if name.startswith("_manifest/"):        # its shard counts as not committed
        shard = name.removeprefix("_manifest/").removesuffix(".json")
        assert causes(report, f"{shard}.parquet") == [
            f"not committed: its manifest _manifest/{shard}.json is unusable; readers would read it unchecked"]
        assert len(report["findings"]) == 2
    else:
        assert len(report["findings"]) == 1, report["findings"]

    result = CliRunner().invoke(main, ["verify", out])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    assert any(line.startswith(f"{path}: {cause}") for line in result.output.splitlines()), result.output


def test_large_files_are_hashed_in_chunks_and_parsed_from_the_open_file(out, monkeypatch):
    monkeypatch.setattr(verify, "SMALL_FILE_BYTES", 1000, raising=False)   # every data and errors file is "large"
    monkeypatch.setattr(verify, "CHUNK_BYTES", 512, raising=False)         # and hashed in several chunks
    whole_reads = []
    real_cat_file = LocalFileSystem.cat_file

    def cat_file(self, path, *args, **kwargs):
        if str(path).endswith(".parquet"):
            whole_reads.append(path)
        return real_cat_file(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "cat_file", cat_file)
    assert min(os.path.getsize(p) for p in glob.glob(f"{out}/**/*.parquet", recursive=True)) > 1000
    report = verify_output(out)
    assert report["ok"] and report["rows"] == 62 and report["checksums_checked"] == 4, report["findings"]

    path = f"{out}/train-000000.parquet"
    data = bytearray(open(path, "rb").read())
    data[len(data) - 700] ^= 0xFF                             # past the first chunks
    open(path, "wb").write(bytes(data))
    found = causes(verify_output(out), "train-000000.parquet")
    assert "sha256 differs from the one recorded at commit (altered)" in found

    table = with_codes(pq.read_table(f"{out}/train-000001.parquet"), 17, 0, 64)
    pq.write_table(table, f"{out}/train-000001.parquet", row_group_size=5)      # the bad code in row group 3
    found = causes(verify_output(out), "train-000001.parquet")
    assert "codes outside [0, 64) (1 values, e.g. 64)" in found
    assert whole_reads == []
