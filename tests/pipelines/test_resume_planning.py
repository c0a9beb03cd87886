"""Planning a rerun costs listings, not a request per shard: brace ranges are matched against one
listing of their directory, finished shards come from two listings plus concurrent manifest
reads. Counted on a real S3 API (moto on loopback) by instrumenting s3fs's one entry point for
S3 calls."""
from __future__ import annotations

import collections
import json

import pytest

from pipelines.shards.urls import expand_urls
from pipelines.errors import UserError
from pipelines.manifests import read_manifests
from pipelines.tokenize.outputs import OutputDir

SHA = "ab" * 32


@pytest.fixture
def s3(s3_env, monkeypatch):
    """(filesystem, Counter of S3 API calls by operation name made through s3fs)."""
    import s3fs

    calls = collections.Counter()
    original = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        calls[method] += 1
        return await original(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    fs = s3fs.S3FileSystem()
    if not fs.exists("vqtok-plan"):
        fs.mkdir("vqtok-plan")
    return fs, calls


def _fresh(fs, calls):
    fs.invalidate_cache()
    calls.clear()


@pytest.mark.parametrize("n", [20, 120])
def test_brace_range_costs_one_listing_not_one_request_per_shard(s3, n):
    fs, calls = s3
    prefix = f"vqtok-plan/in{n}"
    fs.pipe({f"{prefix}/train-{i:06d}.tar": b"x" for i in range(n)})
    _fresh(fs, calls)
    urls = expand_urls([f"s3://{prefix}/train-{{000000..{n - 1:06d}}}.tar"])
    assert urls == [f"s3://{prefix}/train-{i:06d}.tar" for i in range(n)]
    assert sum(calls.values()) <= 2, calls          # one (paginated) listing, whatever n is

    _fresh(fs, calls)
    with pytest.raises(UserError, match=f"train-{n:06d}.tar does not exist"):
        expand_urls([f"s3://{prefix}/train-{{000000..{n:06d}}}.tar"])
    assert sum(calls.values()) <= 5, calls          # the listing, then a check of the one missing name


def test_brace_range_over_directories_and_globs_keeps_its_meaning(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(2):
            (tmp_path / d / f"x-{i}.tar").write_bytes(b"")
        (tmp_path / d / "notes.txt").write_bytes(b"")
    urls = expand_urls([f"{tmp_path}/{{a,b}}"])                     # directories: their .tar files
    assert [u[len(str(tmp_path)) + 1:] for u in urls] == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
    urls = expand_urls([f"{tmp_path}/{{b,a}}/x-*.tar"])             # globs inside a brace range
    assert [u[len(str(tmp_path)) + 1:] for u in urls] == ["b/x-0.tar", "b/x-1.tar", "a/x-0.tar", "a/x-1.tar"]
    with pytest.raises(UserError, match="c does not exist"):
        expand_urls([f"{tmp_path}/{{a,c}}"])


def _committed_output(fs, root: str, n: int, sha: str = SHA) -> list[str]:
    shards = [f"train-{i:06d}" for i in range(n)]
    files = {f"{root}/{s}.parquet": b"PAR1" for s in shards}
    files.update({f"{root}/_manifest/{s}.json": json.dumps(
        {"tokenizer_sha256": sha, "counts": {"read": 2, "ok": 2, "failed": 0, "failed_by_reason": {},
                                             "shard_errors": 0},
         "durations_s": {"read": 0.1}, "worker": {"host": "h"}}).encode() for s in shards})
    fs.makedirs(f"{root}/_manifest", exist_ok=True)   # a no-op on object stores
    fs.pipe(files)
    return shards


@pytest.mark.parametrize("n", [20, 120])
def test_finished_shards_cost_two_listings_plus_concurrent_reads(s3, n):
    fs, calls = s3
    root = f"vqtok-plan/out{n}"
    shards = _committed_output(fs, root, n)
    fs.rm(f"{root}/train-000003.parquet")                    # a manifest without data: not done
    fs.pipe(f"{root}/_manifest/train-000004.json", json.dumps({"tokenizer_sha256": "cd" * 32}).encode())
    _fresh(fs, calls)
    done = OutputDir(f"s3://{root}").finished(shards + ["train-999999"], SHA)
    assert set(done) == set(shards) - {"train-000003", "train-000004"}
    assert done["train-000000"] == {"counts": {"read": 2, "ok": 2, "failed": 0, "failed_by_reason": {},
                                              "shard_errors": 0}, "durations_s": {"read": 0.1}}
    listings = sum(v for k, v in calls.items() if k.startswith("list_objects"))
    reads = calls["get_object"]
    assert listings <= 2 and reads == n - 1, calls          # one read per candidate manifest, no more
    assert sum(calls.values()) == listings + reads, calls   # no per-shard existence checks


def test_manifest_reads_run_concurrently(tmp_path, monkeypatch):
    """The reads overlap (object stores are latency-bound): with a 50 ms stall per read, many are
    in flight at once."""
    import threading
    import time

    import fsspec

    fs = fsspec.filesystem("file")
    shards = _committed_output(fs, str(tmp_path), 64)
    active, peak = [0], [0]
    lock = threading.Lock()
    original = fs.cat_file

    def slow_cat(path, *a, **kw):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return original(path, *a, **kw)

    monkeypatch.setattr(fs, "cat_file", slow_cat)
    paths = [f"{tmp_path}/_manifest/{s}.json" for s in shards] + [f"{tmp_path}/_manifest/nope.json"]
    got = read_manifests(fs, paths, threads=32)
    assert list(got) == paths and all(got[p]["tokenizer_sha256"] == SHA for p in paths[:-1])
    assert isinstance(got[paths[-1]], FileNotFoundError)
    assert peak[0] >= 8


def test_index_of_the_last_run_replaces_the_manifest_reads(s3):
    """After a run recorded its index, planning reads one object, not one manifest per shard; the
    listings still decide what is finished (a deleted manifest or data file is not done, a shard
    the index does not know is read from its manifest)."""
    fs, calls = s3
    root = "vqtok-plan/indexed"
    shards = _committed_output(fs, root, 50)
    out = OutputDir(f"s3://{root}")
    done = out.finished(shards, SHA)
    out.record_finished(done, SHA, changed=False)           # stale: every manifest was read
    _fresh(fs, calls)
    again = OutputDir(f"s3://{root}")
    assert again.finished(shards, SHA) == done
    assert calls["get_object"] == 1 and sum(calls.values()) <= 3, calls
    again.record_finished(done, SHA, changed=False)        # nothing new: not rewritten
    assert calls["put_object"] == 0

    fs.rm(f"{root}/_manifest/{shards[0]}.json")            # the listings win over the index
    fs.rm(f"{root}/{shards[1]}.parquet")
    extra = _committed_output(fs, "vqtok-plan/extra", 51)[50]   # a shard the index does not know
    fs.copy([f"vqtok-plan/extra/{extra}.parquet", f"vqtok-plan/extra/_manifest/{extra}.json"],
            [f"{root}/{extra}.parquet", f"{root}/_manifest/{extra}.json"])
    _fresh(fs, calls)
    done = OutputDir(f"s3://{root}").finished(shards + [extra], SHA)
    assert set(done) == set(shards[2:]) | {extra}
    assert calls["get_object"] == 2, calls                  # the index and the unknown manifest

    _fresh(fs, calls)                                       # another tokenizer's index is ignored
    assert OutputDir(f"s3://{root}").finished(shards, "cd" * 32) == {}
