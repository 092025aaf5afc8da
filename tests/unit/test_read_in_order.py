"""`sources.read_in_order`: image files read several at a time (the inference actor
reading its own chunks with --decode gpu) come back in manifest order, a missing file
as that sample's error, and a reader that stops early does not wait for the rest."""
from __future__ import annotations

import threading
from pathlib import Path

from pipeline.sources import read_in_order


def files(tmp_path: Path, n: int) -> list[tuple[str, str]]:
    rows = []
    for i in range(n):
        path = tmp_path / f"{i:03d}.jpg"
        if i % 7 != 3:  # every 7th file, from the 4th, is missing
            path.write_bytes(f"image {i}".encode() * (1 + i % 5))
        rows.append((str(path), f"id{i}"))
    return rows


def test_threads_read_in_order_with_errors(tmp_path: Path) -> None:
    rows = files(tmp_path, 50)
    one = list(read_in_order(iter(rows), 1))
    many = list(read_in_order(iter(rows), 8))
    assert [(s.uri, s.image_id) for s in many] == rows == [(s.uri, s.image_id) for s in one]
    for i, (a, b) in enumerate(zip(one, many)):
        if i % 7 == 3:
            assert a.data is None and b.data is None and isinstance(b.error, FileNotFoundError)
        else:
            assert a.data == b.data == f"image {i}".encode() * (1 + i % 5) and b.error is None


def test_a_reader_that_stops_early(tmp_path: Path) -> None:
    samples = read_in_order(iter(files(tmp_path, 1000)), 4)
    assert next(samples).image_id == "id0"
    assert any(t.name.startswith("sempart-fetch") for t in threading.enumerate())
    samples.close()  # the pool shuts down, reads not started are dropped
    assert not any(t.name.startswith("sempart-fetch") for t in threading.enumerate())
