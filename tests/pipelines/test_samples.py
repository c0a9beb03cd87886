"""The one sample policy (pipelines/samples.py): every stage judges a sample the same way."""
from __future__ import annotations

import collections

import numpy as np

import tok_data as td
from pipelines.evaluate import iter_images
from pipelines.samples import REASONS, Rejection, SamplePolicy, printable
from pipelines.shards.reader import Sample, TarShardReader
from pipelines.train.data import ShardStream


def test_tokenize_eval_and_training_reject_the_same_samples_for_the_same_reasons(tmp_path):
    data, expected_ok, reasons = td.hostile_shard()
    url = td.write(tmp_path / "hostile.tar", data)
    policy = SamplePolicy(1, 28, ("cls",))
    judged = [policy(s) for s in TarShardReader(url, policy.wants)]
    rejected = {r.key: r.reason for r in judged if isinstance(r, Rejection)}
    assert rejected == reasons
    assert all(r.reason in REASONS for r in judged if isinstance(r, Rejection))

    skipped: list = []
    images = list(iter_images([url], 1, 28, skipped))
    assert len(images) == len(expected_ok)
    assert {key: reason for _, key, reason in skipped} == reasons

    (batch,) = ShardStream([url], channels=1, resolution=28, batch_size=100, shuffle_buffer=1,
                           endless=False)
    assert len(batch["images"]) == len(expected_ok) and batch["bad"] == len(reasons)


def _sample(**kw) -> Sample:
    return Sample("k", fields=kw.pop("fields", {"png": td.png(np.zeros((28, 28), np.uint8))}), **kw)


def test_the_first_applicable_reason_wins_and_unwanted_fields_do_not_matter():
    policy = SamplePolicy(1, 28, ("cls",), max_member_bytes=10)
    assert isinstance(policy(_sample())[0], np.ndarray)
    # problems with fields the stage never reads cost nothing
    assert not isinstance(policy(_sample(special={"json": "symbolic link"}, repeated=["txt"],
                                         too_large={"bin": 99})), Rejection)
    cases = [
        (_sample(stray="member name has no extension"), "stray_member"),
        (Sample("caf\udce9", fields={}), "invalid_key"),
        (_sample(duplicate=True, complete=False), "duplicate_key"),
        (_sample(complete=False, repeated=["png"]), "incomplete_sample"),
        (_sample(repeated=["png"], special={"cls": "FIFO"}), "duplicate_field"),
        (_sample(special={"cls": "hard link"}, too_large={"jpg": 99}), "unsupported_member"),
        (_sample(too_large={"jpg": 99}), "member_too_large"),
        (Sample("k", skipped=["txt"]), "no_image"),
        (_sample(fields={"png": b""}), "empty_image"),
    ]
    for sample, reason in cases:
        judged = policy(sample)
        assert isinstance(judged, Rejection) and judged.reason == reason, (sample, judged)
        judged.key.encode("utf-8")            # always storable


def test_printable_escapes_only_undecodable_bytes():
    assert printable("caf\udce9 \u00e9") == "caf\\xe9 \u00e9"
    assert printable("plain") == "plain"
    counts = collections.Counter(REASONS)
    assert max(counts.values()) == 1
