"""CodeEncoder codes do not depend on the batch (pipelines/tokenize/encoder.py)."""

from __future__ import annotations

import numpy as np
import pytest

import tok_data as td
from pipelines.tokenize.encoder import CodeEncoder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    td.save_tokenizer(path)
    return str(path)


def test_codes_do_not_depend_on_batch_composition(tok_dir):
    images, _ = td.fashion_mnist(300)
    x = images[:, None]
    enc = CodeEncoder(tok_dir, threads=1)
    full = enc.encode(x)
    assert len(np.unique(full)) > 5   # the tokenizer really distinguishes images
    one_by_one = np.concatenate([enc.encode(x[i:i + 1]) for i in range(0, 70)])
    assert np.array_equal(full[:70], one_by_one)
    order = np.random.default_rng(0).permutation(300)
    shuffled = enc.encode(x[order])
    assert np.array_equal(full[order], shuffled)
    for step in (7, 65, 129):
        parts = np.concatenate([enc.encode(x[i:i + step]) for i in range(0, 300, step)])
        assert np.array_equal(full, parts), step
    enc2 = CodeEncoder(tok_dir, threads=2)
    assert np.array_equal(full, enc2.encode(x))
