"""The output directory as a whole: claim it for one tokenizer, find finished shards, _SUCCESS.

OUTPUT/_vqtok.json records what the directory holds (tokenizer sha, grid, kept fields,
preprocessing). A run with different settings is refused unless --overwrite, which clears the
previous outputs first, so one directory never mixes codes of two tokenizers. `prepare` deletes
(temporary files, or everything with --overwrite): call it only while holding the output's lease
(lease.py), so that it never deletes another job's files.
"""
from __future__ import annotations

import gzip
import json
import zlib

import fsspec

from tokenizer.storage import is_local_fs, join_url

from ..errors import UserError
from ..manifests import read_manifests
from ..output_dir import make_output_dir
from ..output_format import (ERRORS_DIR, MANIFEST_DIR, RUN_FILE, SUCCESS_NAME, OutputMetadata, committed_shards,
                             manifest_problem, shard_files, shard_listing, success_path)
from .commit import TMP_DIR, put_atomic

INDEX_NAME = "_index.json.gz"    # OUTPUT/_manifest/_index.json.gz: finished shards' slim manifests


def slim_manifest(manifest: dict) -> dict:
    """What a rerun's summary needs of a shard's manifest; the rest stays in the manifest file."""
    return {"counts": manifest["counts"], "durations_s": manifest["durations_s"]}


SUMMED_COUNTS = ("read", "ok", "failed", "shard_errors")


def summable(slim) -> bool:
    """Whether a (slim) manifest has every number the summary adds up, of the right type: a
    manifest edited or damaged by hand makes its shard unfinished (redone), never a traceback."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(slim, dict):
        return False
    counts, durations = slim.get("counts"), slim.get("durations_s")
    return (isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in SUMMED_COUNTS)
            and isinstance(counts.get("failed_by_reason"), dict)
            and all(isinstance(v, int) for v in counts["failed_by_reason"].values())
            and isinstance(durations, dict) and all(number(v) for v in durations.values()))


def read_index(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    """The index `record_finished` wrote under the output at path `root` ({"version",
    "tokenizer_sha256", "shards": {shard: slim manifest}}), or None when absent or unusable."""
    try:
        index = json.loads(gzip.decompress(fs.cat_file(join_url(root, MANIFEST_DIR, INDEX_NAME))))
    except (OSError, ValueError, EOFError, zlib.error):
        return None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), dict):
        return None
    return index


class OutputDir:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as e:
            raise UserError(f"--output {url}: unsupported URL ({e})") from None
        self.root = self.root.rstrip("/")
        self._index_stale = True      # until `finished` found every finished shard in the index

    def check_location(self) -> None:
        """UserError unless the output is a directory, or can become one, that files can be
        created in (before any job touches it)."""
        make_output_dir(self.url, "--output")

    def identity(self, meta: OutputMetadata, keep_fields: list[str]) -> dict:
        return {"tokenizer_sha256": meta.tokenizer_sha256, "codebook_size": meta.codebook_size,
                "grid": list(meta.grid), "channels": meta.channels, "resolution": meta.resolution,
                "preprocessing": meta.preprocessing, "keep_fields": list(keep_fields),
                "version": meta.version}

    def prepare(self, meta: OutputMetadata, keep_fields: list[str], overwrite: bool) -> None:
        """Refuse a directory made with other settings (unless overwrite), then claim it: clear it
        (overwrite) or its leftover temporary files. Only while this job holds the output's lease."""
        want = self.identity(meta, keep_fields)
        have = self._existing_identity()
        if overwrite:
            self.clear()
        elif have is not None and have != want:
            raise UserError(self._mismatch(have, want))
        elif have is None and self._data_files():
            raise UserError(f"--output {self.url} already holds .parquet files without a vqtok run "
                            "record; choose an empty directory or pass --overwrite to replace them")
        self._clean_tmp()
        if have != want or overwrite:
            put_atomic(join_url(self.url, RUN_FILE), json.dumps(want, indent=1).encode(), self.url)

    def _existing_identity(self) -> dict | None:
        try:
            with self.fs.open(join_url(self.root, RUN_FILE), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UserError(f"{join_url(self.url, RUN_FILE)}: unreadable ({e}); pass --overwrite to start over") from None

    def _mismatch(self, have: dict, want: dict) -> str:
        diff = [k for k in want if have.get(k) != want[k]]
        key = diff[0] if diff else "settings"
        if key == "tokenizer_sha256":
            what = (f"tokenizer {have.get(key, '?')[:12]}..., this run uses "
                    f"{want[key][:12]}...")
        else:
            what = f"{key} = {have.get(key)!r}, this run has {want.get(key)!r}"
        return (f"--output {self.url} holds codes made with a different {key} ({what}); "
                "use another --output, or pass --overwrite to delete them and start over")

    def _data_files(self) -> list[str]:
        return sorted(shard_files(self.fs, self.root).data.values())

    def clear(self) -> None:
        for path in self._data_files():
            self.fs.rm(path)
        for name in (ERRORS_DIR, MANIFEST_DIR, TMP_DIR, SUCCESS_NAME, RUN_FILE):
            path = join_url(self.root, name)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

    def _clean_tmp(self) -> None:
        """Leftovers of a killed run: temporary files never renamed into place."""
        path = join_url(self.root, TMP_DIR)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def finished(self, shards: list[str], sha: str) -> dict[str, dict]:
        """shard -> its slim manifest ({"counts", "durations_s"}: what the summary needs) for the
        shards whose manifest (the commit marker) and data file exist and whose tokenizer matches.

        Costs two listings (the manifests, the data files) plus one read of the index that the
        previous run left (`record_finished`); only manifests the index does not know are read,
        concurrently. Whether a shard is done always comes from the listings: the index is a
        cache of manifest contents, never a substitute for a manifest."""
        listing = shard_listing(self.fs, self.root)
        committed = committed_shards(self.fs, self.root, listing)
        candidates = [s for s in shards if s in committed]
        has_index = join_url(self.root, MANIFEST_DIR, INDEX_NAME) in listing
        index = self._read_index(sha) if has_index and candidates else {}
        done = {s: index[s] for s in candidates if summable(index.get(s))}
        unknown = [s for s in candidates if s not in done]
        paths = [committed[s][1] for s in unknown]
        threads = 1 if is_local_fs(self.fs) else 32     # local reads: threads cost more than they save
        for shard, manifest in zip(unknown, read_manifests(self.fs, paths, threads).values()):
            # an unreadable or torn manifest cannot exist (atomic commits), but never trust one
            if manifest_problem(manifest) is None and manifest["tokenizer_sha256"] == sha \
                    and summable(manifest):
                done[shard] = slim_manifest(manifest)
        self._index_stale = bool(unknown)
        return done

    def record_finished(self, manifests: dict[str, dict], sha: str, changed: bool) -> None:
        """Write the index of finished shards (shard -> slim manifest) that the next run's
        `finished` reads instead of one manifest per shard. Skipped when nothing changed."""
        if not (changed or self._index_stale) or not manifests:
            return
        index = {"version": 1, "tokenizer_sha256": sha,
                 "shards": {s: slim_manifest(m) for s, m in manifests.items()}}
        put_atomic(join_url(self.url, MANIFEST_DIR, INDEX_NAME),
                   gzip.compress(json.dumps(index, separators=(",", ":")).encode(), mtime=0), self.url)

    def _read_index(self, sha: str) -> dict[str, dict]:
        index = read_index(self.fs, self.root)
        if index is None or index.get("tokenizer_sha256") != sha:
            return {}                 # no usable index: every manifest is read instead
        return index["shards"]

    def mark_success(self, summary: dict) -> None:
        put_atomic(success_path(self.url), json.dumps(summary, indent=1).encode(), self.url)

    def clear_success(self) -> None:
        path = success_path(self.root)
        if self.fs.exists(path):
            self.fs.rm(path)

