"""CodesDataset: exact partitioning over ranks x DataLoader workers, shuffling, refusals."""
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from codes_output import output_metadata, tiny_model, write_output
from pipelines import CodesDataset
from pipelines import output_format as fmt
from pipelines.errors import UserError

SHARDS = {"train-000000": 13, "train-000001": 0, "train-000002": 7, "train-000003": 10}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def output(tmp_path_factory, model):
    out = tmp_path_factory.mktemp("codes")
    rows = write_output(out, model, SHARDS, row_group_size=4,
                        errors={"train-000002": [("bad-1", "undecodable image: cannot identify"),
                                                 (None, "truncated tar: unexpected end")]})
    return str(out), rows


def keys_of(dataset, num_workers=0):
    if num_workers == 0:
        return [row["key"] for row in dataset]
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers)
    return [k for batch in loader for k in batch["key"]]


def test_rows_codes_and_fields_are_exact(output, model):
    out, rows = output
    ds = CodesDataset(out)
    seen = list(ds)
    assert len(ds) == len(seen) == sum(SHARDS.values()) == len(rows)
    assert ds.grid == model.grid and ds.codebook_size == model.codebook_size
    for row in seen:
        assert set(row) == {"key", "codes", "cls"}
        assert row["codes"].dtype == torch.int64 and tuple(row["codes"].shape) == model.grid
        np.testing.assert_array_equal(row["codes"].numpy(), rows[row["key"]]["codes"])
        assert row["cls"] == rows[row["key"]]["cls"]


def test_defaults_pass_the_kept_fields_that_exist(tmp_path, model):
    rows = write_output(tmp_path / "photos", model, {"a": 3, "b": 2}, labelled=False)   # no cls column
    got = list(CodesDataset(str(tmp_path / "photos")))
    assert {r["key"] for r in got} == set(rows) and all(set(r) == {"key", "codes"} for r in got)
    with pytest.raises(UserError, match="no column 'cls'"):
        CodesDataset(str(tmp_path / "photos"), fields=("cls",))
    labelled = CodesDataset(str(tmp_path / "labelled")) if write_output(tmp_path / "labelled", model, {"a": 2}) else None
    assert labelled.fields == ("cls",) and set(next(iter(labelled))) == {"key", "codes", "cls"}
    assert CodesDataset(str(tmp_path / "labelled"), fields=()).fields == ()


def test_codes_decode_like_the_model_encoded_them(output, model):
    out, rows = output
    row = next(iter(CodesDataset(out, fields=())))
    assert set(row) == {"key", "codes"}
    x = rows[row["key"]]["image"][None]
    torch.testing.assert_close(model.decode(row["codes"][None]), model.decode(model.encode(x)))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 40])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_pieces_partition_rows_exactly(output, world_size, num_workers, shuffle):
    out, rows = output
    seen, per_rank = Counter(), []
    for rank in range(world_size):
        ds = CodesDataset(out, rank=rank, world_size=world_size, shuffle=shuffle, seed=3)
        n = 0
        for worker in range(num_workers):
            for p in ds.pieces(worker, num_workers):
                seen.update((p.group.path, p.group.index, i) for i in range(p.start, p.stop))
                n += p.stop - p.start
        assert n == len(ds)
        per_rank.append(n)
    assert max(seen.values()) == 1 and sum(seen.values()) == len(rows)
    assert max(per_rank) - min(per_rank) <= 1     # DDP ranks stay in step


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 2), (3, 1)])
def test_ranks_times_dataloader_workers_see_every_key_once(output, world_size, num_workers):
    out, rows = output
    keys = []
    for rank in range(world_size):
        keys += keys_of(CodesDataset(out, rank=rank, world_size=world_size), num_workers)
    assert len(keys) == len(set(keys)) and set(keys) == set(rows)


def test_rank_and_world_size_default_from_environment(output, monkeypatch):
    out, rows = output
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    ds = CodesDataset(out)
    assert (ds.rank, ds.world_size) == (1, 2)
    other = CodesDataset(out, rank=0)
    assert set(keys_of(ds)) | set(keys_of(other)) == set(rows)
    assert not set(keys_of(ds)) & set(keys_of(other))
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UserError, match="rank 2"):
        CodesDataset(out)


def test_shuffle_is_seeded_and_changes_with_epoch(output):
    out, rows = output
    def order(seed, epoch, **kw):
        ds = CodesDataset(out, shuffle=True, seed=seed, shuffle_buffer=5, **kw)
        ds.set_epoch(epoch)
        return keys_of(ds)
    plain = keys_of(CodesDataset(out))
    a = order(0, 0)
    assert a == order(0, 0) and sorted(a) == sorted(plain) and a != plain
    assert order(0, 1) != a and sorted(order(0, 1)) == sorted(a)
    assert order(1, 0) != a
    # with workers and ranks the shuffled epoch is still an exact partition
    keys = [k for r in range(2) for k in keys_of(
        _epoch(CodesDataset(out, rank=r, world_size=2, shuffle=True, seed=5), 3), num_workers=2)]
    assert len(keys) == len(set(keys)) and set(keys) == set(rows)


def _epoch(ds, epoch):
    ds.set_epoch(epoch)
    return ds


def test_only_code_rows_not_errors_or_manifests(output):
    out, rows = output
    assert (out and (pq.read_table(fmt.errors_path(out, "train-000002")).num_rows == 2))
    assert set(keys_of(CodesDataset(out))) == set(rows)


def test_fsspec_url(output):
    import fsspec
    out, rows = output
    mem = fsspec.filesystem("memory")
    for path in fmt.list_data_files(out)[1]:
        mem.pipe(f"/codes-test/{path.rsplit('/', 1)[1]}", open(path, "rb").read())
    mem.pipe("/codes-test/_SUCCESS", b"")
    try:
        ds = CodesDataset("memory://codes-test", rank=1, world_size=2)
        other = CodesDataset("memory://codes-test", rank=0, world_size=2)
        assert sorted(keys_of(ds) + keys_of(other)) == sorted(rows)
    finally:
        mem.rm("/codes-test", recursive=True)


def test_int32_codes_are_read(tmp_path, model):
    rows = write_output(tmp_path, model, {"s": 5}, codes_type=pa.list_(pa.int32()))
    got = {r["key"]: r["codes"].numpy() for r in CodesDataset(str(tmp_path))}
    assert got.keys() == rows.keys()
    for k, v in got.items():
        np.testing.assert_array_equal(v, rows[k]["codes"])


def test_refuses_outputs_mixing_tokenizers(tmp_path, model):
    write_output(tmp_path, model, {"a": 3})
    write_output(tmp_path, tiny_model(seed=1), {"b": 3})
    with pytest.raises(UserError, match=r"different tokenizers.*a\.parquet.*b\.parquet"):
        CodesDataset(str(tmp_path))


def test_refuses_missing_or_invalid_metadata(tmp_path, model):
    write_output(tmp_path, model, {"a": 3})
    plain = pa.table({"key": ["x"], "codes": [[1] * 16]})
    pq.write_table(plain, tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet: no 'vqtok' schema metadata"):
        CodesDataset(str(tmp_path))
    good = json.loads(output_metadata(model).to_json())
    for broken, why in [(b"{not json", "not valid JSON"),
                        (json.dumps({**good, "grid": [4]}).encode(), "invalid 'grid'"),
                        (json.dumps({k: v for k, v in good.items() if k != "codebook_size"}).encode(),
                         "lacks 'codebook_size'"),
                        (json.dumps({**good, "version": 99}).encode(), "newer vqtok")]:
        pq.write_table(plain.replace_schema_metadata({b"vqtok": broken}), tmp_path / "b.parquet")
        with pytest.raises(UserError, match=why):
            CodesDataset(str(tmp_path))


def test_refuses_missing_field_bad_rows_and_empty_dirs(tmp_path, model):
    with pytest.raises(UserError, match="no such tokenize output"):
        CodesDataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no .parquet data files"):
        CodesDataset(str(tmp_path))
    write_output(tmp_path, model, {"a": 3})
    with pytest.raises(UserError, match="no column 'label'.*--keep-fields label"):
        CodesDataset(str(tmp_path), fields=("label",))
    meta = output_metadata(model)
    short = pa.table({"key": ["x"], "shard": ["b"], "codes": [[1, 2, 3]]},
                     schema=fmt.data_schema(meta))
    pq.write_table(short, tmp_path / "b.parquet")
    with pytest.raises(UserError, match=r"b\.parquet: a row has 3 codes"):
        list(CodesDataset(str(tmp_path), fields=()))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(UserError, match=r"b\.parquet: not a readable Parquet file"):
        CodesDataset(str(tmp_path), fields=())


def test_warns_about_an_unfinished_output(tmp_path, model):
    write_output(tmp_path, model, {"a": 3}, success=False)
    with pytest.warns(UserWarning, match="no _SUCCESS"):
        ds = CodesDataset(str(tmp_path))
    assert len(list(ds)) == 3


def test_contract_helpers():
    assert fmt.codes_arrow_type(32768) == pa.list_(pa.int16())
    assert fmt.codes_arrow_type(32769) == pa.list_(pa.int32())
    from pipelines.shards.urls import shard_name
    assert shard_name("s3://b/x/train-000007.tar") == "train-000007"
    meta = fmt.OutputMetadata("f" * 64, 512, (7, 7), 1, 28, {"policy": "x"}, extra={"writer": "y"})
    again = fmt.OutputMetadata.from_json(meta.to_json(), "here")
    assert again == meta and again.num_codes == 49


@pytest.mark.parametrize("world_size,num_workers,batch_size", [(2, 2, 3), (3, 0, 4), (4, 1, 5)])
def test_steps_per_epoch_is_what_every_rank_can_run(output, world_size, num_workers, batch_size):
    out, _ = output
    batches = []
    for rank in range(world_size):
        ds = CodesDataset(out, rank=rank, world_size=world_size)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=num_workers, drop_last=True)
        batches.append(sum(1 for _ in loader))
        steps = ds.steps_per_epoch(batch_size, num_workers)
    assert steps == min(batches) and steps > 0


def test_shuffle_mixes_rows_across_row_groups_and_files(output):
    out, rows = output
    def neighbours_from_one_shard(keys):
        return sum(rows[a]["shard"] == rows[b]["shard"] for a, b in zip(keys, keys[1:]))
    in_order = keys_of(CodesDataset(out))
    mixed = keys_of(CodesDataset(out, shuffle=True, seed=7, shuffle_buffer=10**6))
    assert sorted(mixed) == sorted(in_order)
    assert neighbours_from_one_shard(in_order) == len(in_order) - 3      # 3 non-empty shards
    assert neighbours_from_one_shard(mixed) < 20
