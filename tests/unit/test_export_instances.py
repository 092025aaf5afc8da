"""Exports of instances without Ray: the instance-id image and the gallery thumbnail
that outlines each instance in its own colour."""
from __future__ import annotations

import numpy as np

from pipeline.export import INSTANCE_RGB, MASK_RGB, instance_ids, render_thumbnail
from sempart_core.postprocess import mask_box, mask_to_rle


def two_instances() -> list[np.ndarray]:
    a, b = np.zeros((60, 80), bool), np.zeros((60, 80), bool)
    a[10:30, 10:40], b[35:55, 45:75] = True, True
    return [a, b]


def test_instance_ids_number_the_instances_in_order() -> None:
    masks = two_instances()
    ids = instance_ids((60, 80), [{"mask_rle": mask_to_rle(m)} for m in masks])
    assert ids.dtype == np.uint8 and sorted(np.unique(ids)) == [0, 1, 2]
    assert (ids == 1).sum() == masks[0].sum() and (ids[masks[1]] == 2).all()


def test_gallery_outlines_each_instance_in_its_own_colour() -> None:
    masks = two_instances()
    rgb = np.full((60, 80, 3), 128, np.uint8)
    thumb = np.asarray(render_thumbnail(rgb, masks[0] | masks[1], None, None, size=80,
                                        instances=[(m, mask_box(m)) for m in masks]))
    colours = {tuple(c) for c in thumb.reshape(-1, 3)}
    assert INSTANCE_RGB[0] in colours and INSTANCE_RGB[1] in colours
    assert MASK_RGB not in colours or MASK_RGB == INSTANCE_RGB[0]  # the one-mask colour is not drawn apart
    plain = np.asarray(render_thumbnail(rgb, masks[0] | masks[1], None, None, size=80))
    assert INSTANCE_RGB[1] not in {tuple(c) for c in plain.reshape(-1, 3)}
