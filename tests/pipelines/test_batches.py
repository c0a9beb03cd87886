"""batched: fixed-size lists, the last shorter, at most `limit` items."""
import pytest

from pipelines.batches import batched


def test_fixed_size_lists_the_last_shorter_at_most_limit_items():
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched(range(7), 3, limit=4)) == [[0, 1, 2], [3]]
    assert list(batched(range(7), 3, limit=0)) == []
    assert list(batched([], 3)) == []
    taken = iter(range(100))
    assert list(batched(taken, 2, limit=3)) == [[0, 1], [2]]
    assert next(taken) == 3                                   # nothing read past the limit
    with pytest.raises(ValueError, match="batch size 0"):
        list(batched(range(3), 0))
