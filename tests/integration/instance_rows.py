"""Checks of the `instances` column (schema version 2) shared by the label tests."""
from __future__ import annotations

import numpy as np

from sempart_core.postprocess import mask_box, rle_to_mask


def check_instances(row: dict, most: int) -> list[np.ndarray]:
    """A row's instances are well formed: at most `most`, masks at the image's size,
    disjoint and non-empty, largest first, each box the mask's own and area its pixel
    count, scores in [0, 1]. Returns the masks."""
    instances = row["instances"]
    assert instances is not None and len(instances) <= most, row["instances"]
    masks = [rle_to_mask(i["mask_rle"]) for i in instances]
    taken = np.zeros((row["height"], row["width"]), bool)
    for inst, mask in zip(instances, masks):
        assert mask.shape == taken.shape and mask.any()
        assert not (mask & taken).any()  # disjoint
        taken |= mask
        assert inst["area"] == int(mask.sum()) and inst["box"] == mask_box(mask)
        assert 0.0 <= inst["score"] <= 1.0
    assert [i["area"] for i in instances] == sorted((i["area"] for i in instances), reverse=True)
    return masks
