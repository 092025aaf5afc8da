"""Synthetic scenes as files (`python -m sempart_core.synthetic`), the README's check of
the method on scenes with known masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sempart_core.synthetic import main, synthetic_dataset


def test_written_scenes_are_the_dataset_and_sets_differ_by_seed(tmp_path: Path) -> None:
    main(["--out", str(tmp_path / "a"), "--n", "3", "--size", "40", "--seed", "7"])
    images, masks = synthetic_dataset(3, (40, 40), seed=7)
    for i, (rgb, mask) in enumerate(zip(images, masks)):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "images" / f"{i:04d}.png")), rgb)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a" / "masks" / f"{i:04d}.png")) > 127, mask)
    other, _ = synthetic_dataset(3, (40, 40), seed=8)
    assert not any(np.array_equal(a, b) for a in images for b in other)
