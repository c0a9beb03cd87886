"""The tokenize output contract, as code shared by its writer (`vqtok tokenize`) and its readers
(CodesDataset, decode, inspect).

Layout of an OUTPUT directory (local path or fsspec URL):
    OUTPUT/<shard>.parquet          one per input shard; columns key, shard, codes (+ kept fields)
    OUTPUT/_errors/<shard>.parquet  columns shard, key (null = shard-level), error
    OUTPUT/_manifest/<shard>.json   per finished shard: counts, stage durations, tokenizer sha
    OUTPUT/_SUCCESS                 written when every shard is done
    OUTPUT/_vqtok.json              the run record (tokenizer sha, grid, kept fields, preprocessing)
Every data file carries schema metadata under b"vqtok": JSON describing the tokenizer (see
OutputMetadata). Paths whose name starts with "_" or "." are not data (the convention of pyarrow,
pandas, polars, duckdb, Ray Data and HF datasets), so those readers see only code rows. Readers
read every other .parquet file under OUTPUT, at any depth (list_data_files); a shard, though, is
only OUTPUT/<shard>.parquet, committed once OUTPUT/_manifest/<shard>.json exists (ShardFiles:
the one definition tokenize's resume, inspect and verify use).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenizer.storage import join_url

from .errors import UserError

FORMAT_VERSION = 1
METADATA_KEY = b"vqtok"
KEY, SHARD, CODES = "key", "shard", "codes"   # data columns (plus any --keep-fields)
ERROR_COLUMNS = ("shard", "key", "error")
ERRORS_DIR, MANIFEST_DIR, SUCCESS_NAME = "_errors", "_manifest", "_SUCCESS"
RUN_FILE = "_vqtok.json"                      # the run record: tokenizer, grid, kept fields
DATA_SUFFIX = ".parquet"
MANIFEST_SUFFIX = ".json"
MAX_INT16_CODEBOOK = 32768                    # codes 0..32767 fit int16


@dataclass(frozen=True)
class OutputMetadata:
    """What the `vqtok` schema metadata of every data file says about the codes in it."""
    tokenizer_sha256: str
    codebook_size: int
    grid: tuple[int, int]                     # (h, w); codes are row-major over it
    channels: int
    resolution: int
    preprocessing: str | dict = ""
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)  # unknown keys written by newer writers, kept

    def to_json(self) -> str:
        data = asdict(self)
        extra = data.pop("extra")
        data["grid"] = list(self.grid)
        return json.dumps({**extra, **data}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "") -> "OutputMetadata":
        """Parse and validate; UserError naming `where` for anything missing or malformed."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: 'vqtok' schema metadata is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError(f"{where}: 'vqtok' schema metadata must be a JSON object")
        return cls._validated(data, where)

    @classmethod
    def _validated(cls, data: dict, where: str) -> "OutputMetadata":
        def need(name, ok):
            if name not in data:
                raise UserError(f"{where}: 'vqtok' schema metadata lacks {name!r}")
            if not ok(data[name]):
                raise UserError(f"{where}: 'vqtok' schema metadata has an invalid {name!r}: {data[name]!r}")
            return data[name]

        def pos_int(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        version = need("version", pos_int)
        if version > FORMAT_VERSION:
            raise UserError(f"{where}: written by a newer vqtok (output format {version}; this "
                            f"version reads up to {FORMAT_VERSION}); upgrade vqtok")
        sha = need("tokenizer_sha256", lambda v: isinstance(v, str) and len(v) == 64)
        k = need("codebook_size", lambda v: pos_int(v) and v >= 2)
        grid = need("grid", lambda v: isinstance(v, list) and len(v) == 2 and all(map(pos_int, v)))
        channels = need("channels", pos_int)
        resolution = need("resolution", pos_int)
        known = {"version", "tokenizer_sha256", "codebook_size", "grid", "channels", "resolution",
                 "preprocessing"}
        return cls(tokenizer_sha256=sha, codebook_size=k, grid=(grid[0], grid[1]), channels=channels,
                   resolution=resolution, preprocessing=data.get("preprocessing", ""), version=version,
                   extra={k2: v for k2, v in data.items() if k2 not in known})

    def schema_metadata(self) -> dict[bytes, bytes]:
        return {METADATA_KEY: self.to_json().encode()}

    @property
    def num_codes(self) -> int:
        return self.grid[0] * self.grid[1]


def codes_numpy_dtype(codebook_size: int) -> type:
    """int16 when every code fits it (K <= 32768), else int32: the stored code type."""
    return np.int16 if codebook_size <= MAX_INT16_CODEBOOK else np.int32


def codes_arrow_type(codebook_size: int) -> pa.DataType:
    """list<int16> when every code fits int16 (K <= 32768), else list<int32>."""
    return pa.list_(pa.from_numpy_dtype(codes_numpy_dtype(codebook_size)))


def data_schema(meta: OutputMetadata, extra_fields: list[pa.Field] | tuple = ()) -> pa.Schema:
    """Schema of a data file: key, shard, codes, then the kept fields, with the vqtok metadata."""
    fields = [pa.field(KEY, pa.string()), pa.field(SHARD, pa.string()),
              pa.field(CODES, codes_arrow_type(meta.codebook_size)), *extra_fields]
    return pa.schema(fields, metadata=meta.schema_metadata())


def errors_schema() -> pa.Schema:
    return pa.schema([pa.field(name, pa.string()) for name in ERROR_COLUMNS])


def data_path(output: str, shard: str) -> str:
    return join_url(output, shard + DATA_SUFFIX)


def errors_path(output: str, shard: str) -> str:
    return join_url(output, ERRORS_DIR, shard + DATA_SUFFIX)


def manifest_path(output: str, shard: str) -> str:
    return join_url(output, MANIFEST_DIR, shard + MANIFEST_SUFFIX)


def success_path(output: str) -> str:
    return join_url(output, SUCCESS_NAME)


def is_hidden(relative_path: str) -> bool:
    """True for paths any part of which starts with '_' or '.' (errors, manifests, temp files)."""
    return any(part.startswith(("_", ".")) for part in relative_path.split("/") if part)


def list_data_files(output: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """(filesystem, sorted paths) of the data files under `output`, skipping `_`/`.` paths.
    UserError when `output` does not exist or holds no data file."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise UserError(f"{output}: no such tokenize output directory")
    paths = data_files_among(root, fs.find(root))
    if not paths:
        raise UserError(f"{output}: no {DATA_SUFFIX} data files; is this a `vqtok tokenize` output?")
    return fs, paths


def data_files_among(root: str, paths) -> list[str]:
    """The data files (sorted) among `paths` found under `root`: .parquet, no `_`/`.` part."""
    out = []
    for path in paths:
        rel = path[len(root):].lstrip("/")
        if rel.endswith(DATA_SUFFIX) and not is_hidden(rel):
            out.append(path)
    return sorted(out)


@dataclass(frozen=True)
class ShardFiles:
    """An output's shard files, by the one rule of what a shard is: shard S has the data file
    OUTPUT/S.parquet (directly under OUTPUT) and the manifest OUTPUT/_manifest/S.json, S not
    starting with '_' or '.'. A shard is committed when it has both: its manifest is written
    last (pipelines/tokenize/commit.py), so a data file alone is an interrupted shard."""
    data: dict[str, str]          # shard -> path of its data file
    manifests: dict[str, str]     # shard -> path of its manifest

    def committed(self) -> dict[str, tuple[str, str]]:
        """shard -> (data path, manifest path) of every committed shard, sorted by shard."""
        return {s: (self.data[s], self.manifests[s]) for s in sorted(self.data) if s in self.manifests}


def shard_files(fs: fsspec.AbstractFileSystem, root: str, paths=None) -> ShardFiles:
    """The shard files of the output at `root` (a path on `fs`) among `paths`, a listing of
    files under it (recursive or not; other files are ignored); default: shard_listing's."""
    root = root.rstrip("/")
    if paths is None:
        paths = shard_listing(fs, root)
    data, manifests = {}, {}
    for path in paths:
        if not path.startswith(root + "/"):
            continue
        folder, _, name = path[len(root) + 1:].rpartition("/")
        if is_hidden(name):
            continue
        if folder == "" and name.endswith(DATA_SUFFIX):
            data[name[: -len(DATA_SUFFIX)]] = path
        elif folder == MANIFEST_DIR and name.endswith(MANIFEST_SUFFIX):
            manifests[name[: -len(MANIFEST_SUFFIX)]] = path
    return ShardFiles(data, manifests)


def committed_shards(fs: fsspec.AbstractFileSystem, root: str, paths=None) -> dict[str, tuple[str, str]]:
    """shard -> (data path, manifest path) of the committed shards of the output at `root`
    (see ShardFiles; `paths` as for shard_files)."""
    return shard_files(fs, root, paths).committed()


def shard_listing(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The files directly in OUTPUT and in OUTPUT/_manifest (all that ShardFiles looks at): two
    listings, where a recursive one would cost a round trip per page of every file on object
    stores. A directory that does not exist holds none."""
    root = root.rstrip("/")
    return _files_in(fs, root) + _files_in(fs, join_url(root, MANIFEST_DIR))


def _files_in(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    try:
        entries = fs.ls(directory, detail=True)
    except FileNotFoundError:
        return []
    return [e["name"] for e in entries if e.get("type") == "file"]


def manifest_problem(manifest) -> str | None:
    """What is wrong with the structure of a parsed shard manifest (the fields its readers rely
    on: tokenizer_sha256, counts, files), or None."""
    if not isinstance(manifest, dict):
        return f"must be a JSON object, not {type(manifest).__name__}"
    if not isinstance(manifest.get("tokenizer_sha256"), str):
        return f"'tokenizer_sha256' must be a string, not {manifest.get('tokenizer_sha256')!r:.40}"
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or "ok" not in counts:
        return f"'counts' must be an object with 'ok', not {counts!r:.40}"
    for name in ("ok", "failed", "shard_errors"):
        if name in counts and not _is_count(counts[name]):
            return f"'counts.{name}' must be a non-negative integer, not {counts[name]!r:.40}"
    files = manifest.get("files")       # absent in outputs of vqtok versions that recorded no checksums
    if files is None:
        return None
    if not isinstance(files, dict):
        return f"'files' must be an object, not {files!r:.40}"
    for name in ("data", "errors"):
        entry = files.get(name)
        if entry is not None and not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                                      and _is_count(entry.get("bytes"))):
            return f"'files.{name}' must be {{\"sha256\": string, \"bytes\": integer}}, not {entry!r:.60}"
    return None


def run_record_problem(run) -> str | None:
    """What is wrong with the structure of a parsed run record (_vqtok.json), or None."""
    if not isinstance(run, dict):
        return f"must be a JSON object, not {type(run).__name__}"
    sha = run.get("tokenizer_sha256")
    if not (isinstance(sha, str) and sha):
        return f"'tokenizer_sha256' must be a non-empty string, not {sha!r:.40}"
    k = run.get("codebook_size")
    if not (_is_count(k) and k >= 2):
        return f"'codebook_size' must be an integer >= 2, not {k!r:.40}"
    grid = run.get("grid")
    if not (isinstance(grid, list) and len(grid) == 2 and all(_is_count(g) and g >= 1 for g in grid)):
        return f"'grid' must be a list of two positive integers, not {grid!r:.40}"
    return None


def success_problem(summary) -> str | None:
    """What is wrong with the structure of a parsed _SUCCESS (the job summary), or None."""
    if not isinstance(summary, dict):
        return f"must be a JSON object, not {type(summary).__name__}"
    if not _is_count(summary.get("done")):
        return f"'done' must be the number of finished shards, not {summary.get('done')!r:.40}"
    return None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_metadata(file: str, filesystem: fsspec.AbstractFileSystem | None = None) -> OutputMetadata:
    """The validated vqtok metadata of one data file (a URL, or a path on `filesystem`)."""
    if filesystem is None:
        filesystem, path = fsspec.core.url_to_fs(file)
    else:
        path = file
    try:
        with filesystem.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{file}: not a readable Parquet file ({e})") from None
    return metadata_from_schema(schema, file)


def metadata_from_schema(schema: pa.Schema, where: str) -> OutputMetadata:
    """The validated vqtok metadata of a data file's Arrow schema; UserError naming `where`."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise UserError(f"{where}: no 'vqtok' schema metadata; not written by `vqtok tokenize`")
    meta = OutputMetadata.from_json(raw, where=where)
    _check_columns(schema, meta, where)
    return meta


def _check_columns(schema: pa.Schema, meta: OutputMetadata, where: str) -> None:
    for name in (KEY, CODES):
        if name not in schema.names:
            raise UserError(f"{where}: no {name!r} column")
    codes_type = schema.field(CODES).type
    if not (pa.types.is_list(codes_type) or pa.types.is_large_list(codes_type)) or \
            not pa.types.is_integer(codes_type.value_type):
        raise UserError(f"{where}: column 'codes' has type {codes_type}, expected a list of integers")


def require_same_tokenizer(metas: dict[str, OutputMetadata]) -> OutputMetadata:
    """The one metadata all files share; UserError naming two files that disagree."""
    if not metas:
        raise UserError("no data files")
    (first_path, first), *rest = metas.items()
    for path, meta in rest:
        for name in ("tokenizer_sha256", "codebook_size", "grid"):
            a, b = getattr(first, name), getattr(meta, name)
            if a != b:
                raise UserError(f"files name different tokenizers: {first_path} has {name} {a!r}, "
                                f"{path} has {b!r}; tokenize outputs of different tokenizers "
                                "cannot be mixed")
    return first
