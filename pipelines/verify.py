"""`vqtok verify`: prove a tokenize output whole, file by file, against what was committed.

Checks (each failure is one finding naming the file and the cause; see docs/tokenize.md):
- the run record (_vqtok.json) is readable; _SUCCESS exists;
- every manifest is readable JSON naming the run's tokenizer; every manifest has its data file
  and every data file its manifest (a data file without one is an interrupted shard);
- each data file's bytes match the sha256 and size its manifest recorded at commit (outputs of
  vqtok versions that recorded none are counted as `unchecked`, not as findings);
- each data file is readable Parquet with vqtok schema metadata naming the run's tokenizer, its
  rows equal the manifest's counts.ok, every row's shard column names the file's shard, every
  row has grid-many codes in [0, K), and no key appears twice (so (shard, key) is unique in the
  output; with unique_keys, keys are also unique across shards);
- a shard whose manifest counts failures has its _errors file, matching its checksum and counts;
  an _errors file without a manifest is a failed shard;
- with inputs: every input shard has a manifest.
Files are streamed by row group; several are checked at once (threads).
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

from .errors import UserError
from .output_format import (CODES, DATA_SUFFIX, ERRORS_DIR, KEY, MANIFEST_DIR, RUN_FILE, SHARD, SUCCESS_NAME,
                            codes_array, data_files_among, join, metadata_from_schema, read_manifests)
from .shards.urls import expand_urls, shard_name


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

    def url(self, path: str) -> str:
        """A filesystem path under the output -> the URL the user gave, extended."""
        return join(self.output, path[len(self.root):].lstrip("/"))

    # ---- the whole output ------------------------------------------------------------------
    def run(self) -> dict:
        if not self.fs.isdir(self.root):
            raise UserError(f"{self.output}: no such tokenize output directory")
        paths = self.fs.find(self.root)                 # one recursive listing of everything
        findings: list[Finding] = []
        run = self._run_record(findings)
        sha = run.get("tokenizer_sha256")
        data = {self._stem(p, DATA_SUFFIX): p for p in data_files_among(self.root, paths)}
        errors = {self._stem(p, DATA_SUFFIX): p for p in paths
                  if self._under(p, ERRORS_DIR) and p.endswith(DATA_SUFFIX)}
        manifests = self._manifests(paths, sha, findings)
        if sha is None and manifests:                   # no run record: the manifests decide
            sha = next(iter(manifests.values())).get("tokenizer_sha256")
        if join(self.root, SUCCESS_NAME) not in set(paths):
            findings.append(Finding(self.url(join(self.root, SUCCESS_NAME)),
                                    "missing: the job did not finish (rerun the same `vqtok tokenize`)"))
        for shard in sorted(set(data) - set(manifests)):
            findings.append(Finding(self.url(data[shard]), "no manifest: the shard was not committed "
                                    "(interrupted; rerun the same `vqtok tokenize` to finish it)"))
        for shard in sorted(set(errors) - set(manifests) - set(data)):
            findings.append(Finding(self.url(errors[shard]), "a failed shard: errors but no manifest "
                                    "(rerun the same `vqtok tokenize` to retry it)"))
        for shard in sorted(set(manifests) - set(data)):
            findings.append(Finding(self.url(join(self.root, shard + DATA_SUFFIX)),
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
        return path.startswith(join(self.root, directory) + "/")

    def _run_record(self, findings: list[Finding]) -> dict:
        path = join(self.root, RUN_FILE)
        try:
            run = json.loads(self.fs.cat_file(path))
            if not isinstance(run, dict) or not run.get("tokenizer_sha256"):
                raise ValueError("no tokenizer_sha256")
            return run
        except FileNotFoundError:
            findings.append(Finding(self.url(path), "missing: not a `vqtok tokenize` output, or damaged"))
        except (OSError, ValueError) as e:
            findings.append(Finding(self.url(path), f"unreadable run record ({e})"))
        return {}

    def _manifests(self, paths: list[str], sha: str | None, findings: list[Finding]) -> dict[str, dict]:
        """shard -> manifest of every readable manifest; findings for the others and for a
        tokenizer other than the run's."""
        wanted = sorted(p for p in paths if self._under(p, MANIFEST_DIR) and p.endswith(".json"))
        out = {}
        for path, manifest in read_manifests(self.fs, wanted).items():
            if not isinstance(manifest, dict):
                findings.append(Finding(self.url(path), f"unreadable manifest ({manifest})"))
                continue
            shard = self._stem(path, ".json")
            if sha is not None and manifest.get("tokenizer_sha256") != sha:
                findings.append(Finding(self.url(path), f"names tokenizer {str(manifest.get('tokenizer_sha256'))[:12]}..., "
                                        f"the output's is {sha[:12]}..."))
            out[shard] = manifest
        return out

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
        blob = self._read(path, url, found)
        if blob is None:
            return result
        result.checked_sum = self._check_digest(blob, (manifest.get("files") or {}).get("data"), url, found)
        try:
            parquet = pq.ParquetFile(io.BytesIO(blob))
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
        if run and (run.get("codebook_size"), list(run.get("grid") or ())) != (meta.codebook_size, list(meta.grid)):
            found.append(Finding(url, f"codebook {meta.codebook_size} / grid {list(meta.grid)} differ from the "
                                      f"run record's {run.get('codebook_size')} / {run.get('grid')}"))
        result.rows = self._check_rows(parquet, meta, shard, url, result)
        expected = (manifest.get("counts") or {}).get("ok")
        if result.rows is not None and result.rows != expected:
            found.append(Finding(url, f"{result.rows} rows, its manifest committed {expected}"))
        result.rows = result.rows or 0
        return result

    def _read(self, path: str, url: str, found: list[Finding]) -> bytes | None:
        """The file's bytes (one file per thread in memory: hashing and parsing read them once)."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            found.append(Finding(url, "missing"))
        except OSError as e:
            found.append(Finding(url, f"unreadable ({e})"))
        return None

    @staticmethod
    def _check_digest(blob: bytes, recorded, url: str, found: list[Finding]) -> bool:
        """True when a checksum was recorded (whether it matched or not)."""
        if not isinstance(recorded, dict) or "sha256" not in recorded:
            return False
        if len(blob) != recorded.get("bytes"):
            found.append(Finding(url, f"{len(blob)} bytes, {recorded.get('bytes')} were committed "
                                      "(truncated or replaced)"))
        elif hashlib.sha256(blob).hexdigest() != recorded["sha256"]:
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
        counts = manifest.get("counts") or {}
        expected = int(counts.get("failed", 0)) + int(counts.get("shard_errors", 0))
        url = self.url(path) if path else join(self.output, ERRORS_DIR, shard + DATA_SUFFIX)
        if path is None:
            return [Finding(url, f"missing: its manifest counts {expected} errors")] if expected else []
        found: list[Finding] = []
        blob = self._read(path, url, found)
        if blob is None:
            return found
        self._check_digest(blob, (manifest.get("files") or {}).get("errors"), url, found)
        try:
            rows = pq.ParquetFile(io.BytesIO(blob)).metadata.num_rows
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
