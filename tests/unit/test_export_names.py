"""File names from untrusted image ids, the read-only SQL check, and COCO boxes."""
from __future__ import annotations

import random
import re
import string
from pathlib import Path

import numpy as np
import pytest

from pipeline.export import MAX_NAME, UniqueNames, coco_bbox, safe_name
from pipeline.query import QueryError, check_read_only, where_query
from sempart_core.postprocess import connected_boxes

SAFE = re.compile(r"[A-Za-z0-9._-]+")


def _random_ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.printable + "./\\..éß中\x00 "
    ids = ["", ".", "..", "...", "../..", "/etc/passwd", "a\\..\\b", ".bashrc", "x" * 500, "CON", "a b"]
    ids += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(n)]
    return ids


def test_safe_name_stays_inside_the_folder(tmp_path: Path):
    for image_id in _random_ids(500):
        name = safe_name(image_id)
        assert SAFE.fullmatch(name), (image_id, name)
        assert ".." not in name and not name.startswith(".") and len(name) <= MAX_NAME
        path = (tmp_path / f"{name}.png").resolve()
        assert path.parent == tmp_path.resolve()


def test_safe_ids_keep_their_name():
    for image_id in ["img-001", "a.b_c", "0123abcdef" * 4, "Photo_2024-01-01.jpg"]:
        assert safe_name(image_id) == image_id


def test_unique_names_are_distinct_and_deterministic():
    ids = _random_ids(300, seed=1) + ["a/b", "a_b", "a:b", "A_B", "a_b", "a_b"]
    first, second = UniqueNames(), UniqueNames()
    names = [first(i) for i in ids]
    assert names == [second(i) for i in ids]  # same order, same names
    assert len({n.lower() for n in names}) == len(ids)  # distinct, even case-insensitively
    fresh = UniqueNames()
    clashes = [fresh(i) for i in ["a/b", "a_b", "a:b", "A_B", "a_b"]]
    assert clashes[0] == "a_b"  # the first keeps the plain name, the others get suffixes
    assert all(n.lower().startswith("a_b-") for n in clashes[1:]) and len(set(clashes)) == 5


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "select * from labels where status = 'ok';",
        "WITH t AS (SELECT 1 AS x) SELECT x FROM t",
        "FROM labels SELECT image_id",
        "-- a comment; DROP TABLE labels\nSELECT 'x; DELETE FROM labels'",
        "SELECT 1 UNION ALL SELECT 2",
    ],
)
def test_read_only_check_accepts_single_selects(sql: str):
    assert check_read_only(sql) == sql


@pytest.mark.parametrize(
    "sql",
    [
        "",
        "   ;  ",
        "SELECT 1; SELECT 2",
        "INSERT INTO labels VALUES (1)",
        "UPDATE labels SET score = 1",
        "DROP TABLE labels",
        "CREATE TABLE x AS SELECT 1",
        "COPY (SELECT 1) TO 'x.csv'",
        "ATTACH 'x.db'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "PRAGMA version",
        "SET threads = 1",
        "EXPORT DATABASE 'x'",
        "SELEC 1",
    ],
)
def test_read_only_check_rejects_everything_else(sql: str):
    with pytest.raises(QueryError) as info:
        check_read_only(sql)
    assert "\n" not in str(info.value)


def test_where_predicate_cannot_escape_its_parentheses():
    check_read_only(where_query("score > 0.8 -- trailing comment"))
    with pytest.raises(QueryError):
        check_read_only(where_query("true); DELETE FROM labels; SELECT (1"))
    assert where_query(None, ["image_id"]) == 'SELECT "image_id" FROM labels'


def test_coco_bbox_is_the_mask_extent():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.zeros((int(rng.integers(5, 40)), int(rng.integers(5, 40))), bool)
        y0, x0 = rng.integers(0, mask.shape[0]), rng.integers(0, mask.shape[1])
        mask[y0 : y0 + rng.integers(1, 10), x0 : x0 + rng.integers(1, 10)] = True
        box, _ = connected_boxes(mask, min_area=1)
        ys, xs = np.nonzero(mask)
        assert coco_bbox(box) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
