"""`vqtok verify`: prove a tokenize output whole, file by file, against what was committed.

Checks (each failure is one finding naming the file and the cause; see docs/tokenize.md):
- the run record (_vqtok.json) is readable JSON of the right structure (tokenizer_sha256,
  codebook_size, grid); _SUCCESS exists and is the job summary JSON;
- no shard committed when the job finished is gone: _SUCCESS's "done" count is at most the
  manifests present, and every shard the manifest index (_manifest/_index.json.gz) lists has
  its manifest; the missing shards are named from the index;
- every manifest is readable JSON of the right structure (a malformed one is a finding and its
  shard counts as not committed) naming the run's tokenizer; every manifest has its data file
  and every data file its manifest (a data file without one is an interrupted shard);
- nothing else that readers read is under OUTPUT: every file whose path has no part starting
  with '_' or '.' must be a committed OUTPUT/<shard>.parquet. A .parquet file elsewhere (e.g. a
  copy in a subdirectory) would be read as data by pyarrow.dataset, pandas, CodesDataset and
  `vqtok inspect` (duplicating rows); any other such file makes pyarrow.dataset/pandas fail;
- each data file's bytes match the sha256 and size its manifest recorded at commit (outputs of
  vqtok versions that recorded none are counted as `unchecked`, not as findings);
- each data file is readable Parquet with vqtok schema metadata naming the run's tokenizer, its
  rows equal the manifest's counts.ok, every row's shard column names the file's shard, every
  row has grid-many codes in [0, K), and no key appears twice (so (shard, key) is unique in the
  output; with unique_keys, keys are also unique across shards);
- a shard whose manifest counts failures has its _errors file, matching its checksum and counts;
  an _errors file without a manifest is a failed shard;
- with inputs: every input shard has a manifest.
Memory stays bounded whatever the file sizes: a file up to SMALL_FILE_BYTES is read once (hashed
and parsed from memory); a larger one is hashed in CHUNK_BYTES chunks, then parsed from the open
file row group by row group. Several files are checked at once (threads).
"""
from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tokenizer.storage import join_url

from .code_rows import codes_array
from .errors import UserError, first_few
from .manifests import read_manifests
from .output_format import (CODES, DATA_SUFFIX, ERRORS_DIR, KEY, MANIFEST_DIR, RUN_FILE, SHARD, SUCCESS_NAME,
                            data_files_among, is_hidden, manifest_problem, metadata_from_schema,
                            run_record_problem, shard_files, success_problem)
from .shards.urls import expand_urls, shard_name
from .tokenize.outputs import INDEX_NAME, read_index

SMALL_FILE_BYTES = 8 << 20     # a file up to this size is read into memory once: hashed and parsed
CHUNK_BYTES = 4 << 20          # a larger file is hashed in chunks of this size, then parsed from disk


@dataclass
class Finding:
    path: str       # the file (as a URL under OUTPUT) the finding is about
    cause: str

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}"


@dataclass
class FileResult:
    findings: list[Finding] = field(default_factory=list)
    rows: int = 0
    checked_sum: bool = False
    keys: list[str] | None = None     # only when keys must be unique across shards


class OutputVerifier:
    def __init__(self, output: str, inputs: list[str] | None = None, threads: int = 8,
                 unique_keys: bool = False):
        self.output = output.rstrip("/")
        try:
            self.fs, root = fsspec.core.url_to_fs(self.output)
        except (ValueError, ImportError) as e:
            raise UserError(f"{output}: unsupported URL ({e})") from None
        self.root = root.rstrip("/")
        self.inputs = list(inputs or [])
        self.threads = max(1, threads)
        self.unique_keys = unique_keys
        self.sizes: dict[str, int | None] = {}      # path -> size in bytes, from the listing

    def url(self, path: str) -> str:
        """A filesystem path under the output -> the URL the user gave, extended."""
        return join_url(self.output, self._relative(path))

    def _relative(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")

    # ---- the whole output ------------------------------------------------------------------
    def run(self) -> dict:
        if not self.fs.isdir(self.root):
            raise UserError(f"{self.output}: no such tokenize output directory")
        listing = self.fs.find(self.root, detail=True)  # one recursive listing of everything
        paths = sorted(listing)
        self.sizes = {p: (listing[p] or {}).get("size") for p in paths}
        findings: list[Finding] = []
        run = self._run_record(findings)
        sha = run.get("tokenizer_sha256")
        files = shard_files(self.fs, self.root, paths)
        data = files.data
        findings += self._not_shards(paths, data)
        errors = {self._stem(p, DATA_SUFFIX): p for p in paths
                  if self._under(p, ERRORS_DIR) and p.endswith(DATA_SUFFIX)}
        present, manifests = set(files.manifests), self._manifests(files.manifests, sha, findings)
        if sha is None and manifests:                   # no run record: the manifests decide
            sha = next(iter(manifests.values())).get("tokenizer_sha256")
        findings += self._check_success(listing, present, sha)
        for shard in sorted(set(data) - set(manifests)):
            cause = (f"not committed: its manifest {MANIFEST_DIR}/{shard}.json is unusable; readers would "
                     "read it unchecked" if shard in present else
                     "no manifest: the shard was not committed (interrupted; rerun the same "
                     "`vqtok tokenize` to finish it)")
            findings.append(Finding(self.url(data[shard]), cause))
        for shard in sorted(set(errors) - present - set(data)):
            findings.append(Finding(self.url(errors[shard]), "a failed shard: errors but no manifest "
                                    "(rerun the same `vqtok tokenize` to retry it)"))
        for shard in sorted(set(manifests) - set(data)):
            findings.append(Finding(self.url(join_url(self.root, shard + DATA_SUFFIX)),
                                    "missing: its manifest says the shard was committed"))
        results = self._check_files(data, errors, manifests, sha, run)
        for r in results:
            findings += r.findings
        if self.unique_keys:
            findings += self._cross_shard_duplicates(data, results, manifests)
        if self.inputs:
            findings += self._missing_inputs(manifests)
        return {"output": self.output, "ok": not findings, "findings": [vars(f) for f in findings],
                "shards": len(manifests), "data_files": len(data), "rows": sum(r.rows for r in results),
                "checksums_checked": sum(r.checked_sum for r in results),
                "unchecked_files": sum(not r.checked_sum for r in results),
                "inputs_checked": bool(self.inputs), "tokenizer_sha256": sha}

    def _stem(self, path: str, suffix: str) -> str:
        return path.rsplit("/", 1)[-1][: -len(suffix)]

    def _under(self, path: str, directory: str) -> bool:
        return path.startswith(join_url(self.root, directory) + "/")

    def _not_shards(self, paths: list[str], data: dict[str, str]) -> list[Finding]:
        """A finding for every file readers would read (no part of its path starts with '_' or
        '.') that is not a shard's data file OUTPUT/<shard>.parquet."""
        findings = []
        shards = set(data.values())
        readable = data_files_among(self.root, paths)
        for path in readable:
            if path not in shards:
                findings.append(Finding(self.url(path), "not a committed shard: readers of the output "
                                        "(pyarrow.dataset, pandas, CodesDataset, `vqtok inspect`) would read "
                                        "its rows as data; move it out of the output directory"))
        readable = set(readable)
        for path in paths:
            if path not in readable and not is_hidden(self._relative(path)):
                findings.append(Finding(self.url(path), "stray file: pyarrow.dataset and pandas read every "
                                        "file under the output whose path has no part starting with '_' or "
                                        "'.' (and fail on one that is not Parquet); move it out of the output "
                                        "directory"))
        return findings

    def _run_record(self, findings: list[Finding]) -> dict:
        """The run record, or {} (with a finding) when it is missing, unreadable or malformed."""
        path = join_url(self.root, RUN_FILE)
        try:
            run = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            findings.append(Finding(self.url(path), "missing: not a `vqtok tokenize` output, or damaged"))
            return {}
        except (OSError, ValueError) as e:
            findings.append(Finding(self.url(path), f"unreadable run record ({e})"))
            return {}
        problem = run_record_problem(run)
        if problem:
            findings.append(Finding(self.url(path), f"malformed run record: {problem}"))
            return {}
        return run

    def _manifests(self, paths: dict[str, str], sha: str | None, findings: list[Finding]) -> dict[str, dict]:
        """shard -> manifest of the well-formed ones among `paths` (shard -> manifest path);
        findings for the others and for a tokenizer other than the run's."""
        out = {}
        by_path = {path: shard for shard, path in paths.items()}
        for path, manifest in read_manifests(self.fs, sorted(by_path)).items():
            if isinstance(manifest, Exception):
                findings.append(Finding(self.url(path), f"unreadable manifest ({manifest})"))
                continue
            problem = manifest_problem(manifest)
            if problem:
                findings.append(Finding(self.url(path), f"malformed manifest: {problem}; its shard counts as "
                                        "not committed (delete this manifest and rerun the same `vqtok "
                                        "tokenize` to redo the shard)"))
                continue
            if sha is not None and manifest["tokenizer_sha256"] != sha:
                findings.append(Finding(self.url(path), f"names tokenizer {manifest['tokenizer_sha256'][:12]}..., "
                                        f"the output's is {sha[:12]}..."))
            out[by_path[path]] = manifest
        return out

    def _check_success(self, listing: dict, present: set[str], sha: str | None) -> list[Finding]:
        """_SUCCESS is the job summary, and no shard the job finished has lost its manifest since.
        The summary only counts the finished shards; the manifest index names them."""
        path = join_url(self.root, SUCCESS_NAME)
        url = self.url(path)
        if path not in listing:
            return [Finding(url, "missing: the job did not finish (rerun the same `vqtok tokenize`)")]
        try:
            summary = json.loads(self.fs.cat_file(path))
        except (OSError, ValueError) as e:
            return [Finding(url, f"unreadable job summary ({e})")]
        problem = success_problem(summary)
        if problem:
            return [Finding(url, f"malformed job summary: {problem}")]
        done = summary["done"]
        index = read_index(self.fs, self.root) if join_url(self.root, MANIFEST_DIR, INDEX_NAME) in listing else None
        if index is not None and sha is not None and index.get("tokenizer_sha256") != sha:
            index = None                                # not this run's: it cannot name its shards
        gone = sorted(set(index["shards"]) - present) if index is not None else []
        if done <= len(present) and not gone:
            return []
        why = [f"_SUCCESS counts {done} finished, {len(present)} have a manifest"] if done > len(present) else []
        why.append(f"missing: {first_few(gone)}, named by {MANIFEST_DIR}/{INDEX_NAME}" if gone else
                   "no manifest index names them: pass --input to find them")
        return [Finding(url, f"{max(done - len(present), len(gone))} committed shard(s) are gone "
                             f"({'; '.join(why)}); rerun the same `vqtok tokenize` to redo them")]

    def _missing_inputs(self, manifests: dict[str, dict]) -> list[Finding]:
        return [Finding(url, "input shard not accounted for: no manifest in the output (not tokenized, "
                        "or failed; rerun `vqtok tokenize`)")
                for url in expand_urls(self.inputs) if shard_name(url) not in manifests]

    def _cross_shard_duplicates(self, data: dict, results: list[FileResult], manifests: dict) -> list[Finding]:
        first: dict[str, str] = {}
        out = []
        for shard, r in zip((s for s in sorted(data) if s in manifests), results):
            for key in r.keys or ():
                other = first.setdefault(key, shard)
                if other != shard:
                    out.append(Finding(self.url(data[shard]), f"key {key!r} is also in shard {other}"))
        return out

    # ---- one shard's files -----------------------------------------------------------------
    def _check_files(self, data, errors, manifests, sha, run) -> list[FileResult]:
        """One FileResult per shard that has both a manifest and a data file, in sorted order."""
        shards = [s for s in sorted(data) if s in manifests]

        def one(shard):
            result = self._check_data(shard, data[shard], manifests[shard], sha, run)
            result.findings += self._check_errors(shard, errors.get(shard), manifests[shard])
            return result

        if not shards:
            return []
        with ThreadPoolExecutor(max_workers=min(self.threads, len(shards)), thread_name_prefix="vqtok-verify") as pool:
            return list(pool.map(one, shards))

    def _check_data(self, shard: str, path: str, manifest: dict, sha: str | None, run: dict) -> FileResult:
        result = FileResult(keys=[] if self.unique_keys else None)
        found = result.findings
        url = self.url(path)
        source, result.checked_sum = self._open_checked(path, (manifest.get("files") or {}).get("data"), url, found)
        if source is None:
            return result
        with source:
            try:
                parquet = pq.ParquetFile(source)
                meta = metadata_from_schema(parquet.schema_arrow, url)
            except UserError as e:
                found.append(Finding(url, str(e).removeprefix(f"{url}: ")))
                return result
            except (OSError, pa.ArrowException) as e:
                found.append(Finding(url, f"not a readable Parquet file ({e})"))
                return result
            if sha is not None and meta.tokenizer_sha256 != sha:
                found.append(Finding(url, f"schema metadata names tokenizer {meta.tokenizer_sha256[:12]}..., "
                                          f"the output's is {sha[:12]}..."))
            if run and (run["codebook_size"], list(run["grid"])) != (meta.codebook_size, list(meta.grid)):
                found.append(Finding(url, f"codebook {meta.codebook_size} / grid {list(meta.grid)} differ from the "
                                          f"run record's {run['codebook_size']} / {run['grid']}"))
            rows = self._check_rows(parquet, meta, shard, url, result)
        expected = manifest["counts"]["ok"]
        if rows is not None and rows != expected:
            found.append(Finding(url, f"{rows} rows, its manifest committed {expected}"))
        result.rows = rows or 0
        return result

    def _open_checked(self, path: str, recorded: dict | None, url: str, found: list[Finding]):
        """(the file as a binary file object for pyarrow, or None when it cannot be read; whether
        a checksum was recorded), after comparing its size and sha256 with `recorded`. A small
        file is read once and served from memory; a larger one is hashed in CHUNK_BYTES chunks
        and opened again for parsing, so no file is ever held whole in memory."""
        try:
            size = self.sizes.get(path)
            if size is None:
                size = self.fs.size(path)
            if size <= SMALL_FILE_BYTES:
                blob = self.fs.cat_file(path)
                checked = self._check_digest(len(blob), lambda: hashlib.sha256(blob).hexdigest(),
                                             recorded, url, found)
                return io.BytesIO(blob), checked
            checked = self._check_digest(size, lambda: self._sha256(path), recorded, url, found)
            return self.fs.open(path, "rb"), checked
        except FileNotFoundError:
            found.append(Finding(url, "missing"))
        except OSError as e:
            found.append(Finding(url, f"unreadable ({e})"))
        return None, False

    def _sha256(self, path: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    @staticmethod
    def _check_digest(size: int, sha256, recorded: dict | None, url: str, found: list[Finding]) -> bool:
        """True when a checksum was recorded (whether it matched or not). `sha256()` computes the
        file's digest: only called when the size matches."""
        if recorded is None:
            return False
        if size != recorded["bytes"]:
            found.append(Finding(url, f"{size} bytes, {recorded['bytes']} were committed "
                                      "(truncated or replaced)"))
        elif sha256() != recorded["sha256"]:
            found.append(Finding(url, "sha256 differs from the one recorded at commit (altered)"))
        return True

    def _check_rows(self, parquet: pq.ParquetFile, meta, shard: str, url: str, result: FileResult) -> int | None:
        """Stream the row groups: codes, shard column, duplicate keys. Rows read, None if unreadable."""
        found = result.findings
        seen: set[str] = set()
        duplicates: list[str] = []
        bad_codes = bad_shard = False
        rows = 0
        size = meta.num_codes
        for i in range(parquet.num_row_groups):
            try:
                table = parquet.read_row_group(i, columns=[KEY, SHARD, CODES])
            except (OSError, pa.ArrowException, KeyError) as e:
                found.append(Finding(url, f"row group {i} unreadable ({e})"))
                return None
            rows += table.num_rows
            if not bad_codes:
                try:
                    codes_array(table.column(CODES), meta, url, size)
                except UserError as e:
                    found.append(Finding(url, str(e).removeprefix(f"{url}: ")))
                    bad_codes = True
            shards = set(table.column(SHARD).unique().to_pylist())
            if not bad_shard and shards - {shard}:
                found.append(Finding(url, f"rows name shard(s) {sorted(map(str, shards - {shard}))[:3]}, "
                                          f"the file is shard {shard!r}"))
                bad_shard = True
            for key in table.column(KEY).to_pylist():
                if key in seen:
                    duplicates.append(key)
                seen.add(key)
        if duplicates:
            found.append(Finding(url, f"{len(duplicates)} duplicate key(s), e.g. {duplicates[0]!r}"))
        if result.keys is not None:
            result.keys = sorted(seen)
        return rows

    def _check_errors(self, shard: str, path: str | None, manifest: dict) -> list[Finding]:
        counts = manifest["counts"]
        expected = counts.get("failed", 0) + counts.get("shard_errors", 0)
        url = self.url(path) if path else join_url(self.output, ERRORS_DIR, shard + DATA_SUFFIX)
        if path is None:
            return [Finding(url, f"missing: its manifest counts {expected} errors")] if expected else []
        found: list[Finding] = []
        source, _ = self._open_checked(path, (manifest.get("files") or {}).get("errors"), url, found)
        if source is None:
            return found
        with source:
            try:
                rows = pq.ParquetFile(source).metadata.num_rows      # the footer only
            except (OSError, pa.ArrowException) as e:
                return found + [Finding(url, f"not a readable Parquet file ({e})")]
        if rows != expected:
            found.append(Finding(url, f"{rows} error rows, its manifest counts {expected}"))
        return found


def verify_output(output: str, inputs: list[str] | None = None, threads: int = 8,
                  unique_keys: bool = False) -> dict:
    """The verification report of a tokenize output (see the module docstring for the checks)."""
    return OutputVerifier(output, inputs, threads, unique_keys).run()


def format_report(report: dict) -> str:
    """One line per finding, then a summary line."""
    lines = [f"{f['path']}: {f['cause']}" for f in report["findings"]]
    checked = (f"{report['shards']} shards, {report['data_files']} data files, {report['rows']:,} rows; "
               f"{report['checksums_checked']} recorded checksums compared"
               + (f", {report['unchecked_files']} files without a recorded checksum" if report["unchecked_files"] else "")
               + ("; every input shard accounted for" if report["inputs_checked"] and report["ok"] else ""))
    if report["ok"]:
        lines.append(f"OK {report['output']}: {checked}")
    else:
        lines.append(f"FAILED {report['output']}: {len(report['findings'])} finding(s); {checked}")
    return "\n".join(lines)
