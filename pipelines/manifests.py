"""Reading many shard manifests (OUTPUT/_manifest/<shard>.json) at once: resuming tokenize,
`vqtok inspect` and `vqtok verify` read one per shard."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import fsspec


def read_manifests(fs: fsspec.AbstractFileSystem, paths: list[str], threads: int = 32) -> dict[str, dict | Exception]:
    """{path: parsed JSON, or the exception that reading or parsing it raised}, in the order of
    `paths`. Read concurrently: on an object store each read is a round trip, so 100k manifests
    one after another would take many minutes."""
    def one(path):
        try:
            return json.loads(fs.cat_file(path))
        except (OSError, ValueError) as e:
            return e

    if len(paths) <= 1:
        return {p: one(p) for p in paths}
    with ThreadPoolExecutor(max_workers=min(threads, len(paths)), thread_name_prefix="vqtok-manifest") as pool:
        return dict(zip(paths, pool.map(one, paths)))
