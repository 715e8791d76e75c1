"""benchmarks/common.py: the shared CSV writer and commit hash of the benchmark scripts."""
import csv
import re

import pytest

from benchmarks.common import git_sha, write_rows


def test_write_rows_round_trip_in_first_row_order(tmp_path):
    rows = [dict(b=1, a="x"), dict(b=2.5, a="y, z")]
    path = write_rows(str(tmp_path / "sub" / "t.csv"), rows)
    with open(path, newline="") as f:
        r = csv.reader(f)
        assert next(r) == ["b", "a"]
        assert list(r) == [["1", "x"], ["2.5", "y, z"]]
    with pytest.raises(ValueError, match="no rows to write"):
        write_rows(str(tmp_path / "e.csv"), [])


def test_git_sha_is_a_short_hash_or_empty():
    assert re.fullmatch(r"([0-9a-f]{7,40})?", git_sha())
