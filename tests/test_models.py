"""The classic CT models (the code Triton runs), on a phantom and on the real head CT."""

from __future__ import annotations

import numpy as np

from inference.algorithms import LEFT_LUNG, RIGHT_LUNG, segment_body, segment_lungs
from inference.volume import build_volume
from tests.peers import head_ct_files
from tests.phantoms import chest_phantom
from tests.raster import dice


def test_body_outline_on_phantom_excludes_the_table() -> None:
    p = chest_phantom()
    body = segment_body(p.hu, p.affine).astype(bool)
    assert dice(body, p.body) > 0.99
    table_rows = np.abs(p.hu - 300) < 1
    assert not (body & table_rows).any()


def test_lungs_on_phantom_are_found_and_sided_in_patient_coordinates() -> None:
    p = chest_phantom()
    labels = segment_lungs(p.hu, p.affine)
    assert dice(labels == RIGHT_LUNG, p.right_lung) > 0.98
    assert dice(labels == LEFT_LUNG, p.left_lung) > 0.98
    # mirror the image left-right and the sides follow the patient, not the array
    flipped = p.affine.copy()
    flipped[:, 2] *= -1
    flipped[0, 3] = -p.affine[0, 3]
    mirrored = segment_lungs(p.hu, flipped)
    assert dice(mirrored == LEFT_LUNG, p.right_lung) > 0.98


def test_head_ct_has_a_body_and_no_lungs() -> None:
    """The skull phantom is full of air; enclosed by bone, it is not lung."""
    volume = build_volume(head_ct_files())
    body = segment_body(volume.hu, volume.affine)
    body_ml = body.sum() * volume.voxel_volume_ml
    assert 500 < body_ml < 5000
    assert not segment_lungs(volume.hu, volume.affine).any()
