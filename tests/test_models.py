"""The classic CT models (the code Triton runs), on a phantom and on the real head CT."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_lungs_given_the_body_are_the_lungs_found_alone() -> None:
    """ct-lungs takes ct-body's mask when the job has it: the same lungs, to the voxel."""
    p = chest_phantom()
    body = segment_body(p.hu, p.affine)
    assert np.array_equal(segment_lungs(p.hu, p.affine, body=body), segment_lungs(p.hu, p.affine))
    # the same body as bits (what the node sends: an eighth of the bytes), on an odd width
    hu, body = p.hu[:, :, 3:], body[:, :, 3:]
    from inference.runner import mask_tensor

    bits = mask_tensor(body, 1, packed=True)
    assert bits.shape == (*hu.shape[:2], -(-hu.shape[2] // 8))
    alone = segment_lungs(hu, p.affine, body=body)
    assert alone.any()
    assert np.array_equal(segment_lungs(hu, p.affine, body_bits=bits), alone)


def test_head_ct_has_a_body_and_no_lungs() -> None:
    """The skull phantom is full of air; enclosed by bone, it is not lung."""
    volume = build_volume(head_ct_files())
    body = segment_body(volume.hu, volume.affine)
    body_ml = body.sum() * volume.voxel_volume_ml
    assert 500 < body_ml < 5000
    assert not segment_lungs(volume.hu, volume.affine).any()


def test_body_outline_cuts_off_a_table_that_touches_the_patient() -> None:
    p = chest_phantom()
    y = (np.arange(p.hu.shape[1]) - p.hu.shape[1] / 2 + 0.5) * 2.0
    rows = (y >= 78.0) & (y < 88.0)  # a 10 mm table pressed against the back (body b = 80 mm)
    table = np.zeros_like(p.body)
    table[:, rows, :] = True
    table &= ~p.body
    p.hu[table] = 300
    body = segment_body(p.hu, p.affine).astype(bool)
    from scipy import ndimage

    from_patient_mm = ndimage.distance_transform_edt(~p.body, sampling=(1e4, 2.0, 2.0))
    kept = body & table
    assert not (kept & (from_patient_mm > 12.0)).any()  # nothing beyond the contact zone
    assert kept.sum() < 0.25 * table.sum()  # a sliver under the patient's back at most
    assert dice(body, p.body) > 0.98


def test_models_on_gantry_tilted_and_partially_covered_ct() -> None:
    """A 15-degree gantry tilt (each slice shifted along y) and lungs cut by the first slice:
    the classic model and the network (whose resampling then takes the general affine path)
    still agree on the lungs."""
    import warnings

    import torch

    from inference.cards import load_card
    from inference.runner import run_model, torchscript_predictor
    from tests.peers import ROOT
    from tests.phantoms import random_chest_phantom

    warnings.filterwarnings("ignore", category=FutureWarning)
    p = random_chest_phantom(np.random.default_rng(90009), slices=40, size=256, pixel_mm=1.4)
    affine = p.affine.copy()
    affine[1, 0] = affine[2, 0] * np.tan(np.radians(15.0))
    truth = p.right_lung | p.left_lung
    assert truth[0].any()  # coverage starts inside the lungs
    classic = segment_lungs(p.hu, affine) > 0
    assert dice(classic, truth) > 0.95
    card = load_card(ROOT / "config/models/ct-lungs-unet.yaml")
    module = torch.jit.load(str(ROOT / "inference/model_repository/ct-lungs-unet/1/model.pt"))
    out = run_model(card, p.hu, affine, predict=torchscript_predictor(module))
    assert out.labels is not None
    assert dice(out.labels == 1, classic) > 0.9


def test_real_gantry_tilted_series_runs_through_every_model() -> None:
    """dicom2nifti's tilted CT (4 slices, no tissue to speak of): a result, not an error."""
    import warnings

    import torch

    from inference.cards import load_card
    from inference.runner import run_model, torchscript_predictor
    from tests.peers import ROOT, SHARED_DICOM

    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = SHARED_DICOM / "odd/dicom2nifti/tests/data/failing/gantrytilting/001"
    volume = build_volume(sorted(folder.iterdir()))
    assert abs(volume.affine[1, 0]) > 0.1 or abs(volume.affine[2, 1]) > 0.1  # really tilted
    assert segment_lungs(volume.hu, volume.affine).shape == volume.hu.shape
    card = load_card(ROOT / "config/models/ct-lungs-unet.yaml")
    module = torch.jit.load(str(ROOT / "inference/model_repository/ct-lungs-unet/1/model.pt"))
    out = run_model(card, volume.hu, volume.affine, predict=torchscript_predictor(module))
    assert out.labels is not None and out.labels.shape == volume.hu.shape


def test_body_holds_lungs_that_the_field_of_view_cuts() -> None:
    """A chest phantom cropped so that both lungs touch the image's left and right borders:
    the body still holds the lungs, and the air outside the patient stays outside."""
    from inference.algorithms import truncated_slices

    p = chest_phantom()
    x = (np.arange(p.hu.shape[2]) - p.hu.shape[2] / 2 + 0.5) * 2.0
    keep = np.abs(x) < 80.0  # the lungs reach |x| = 95 mm: the crop cuts through them
    hu, body_truth = p.hu[:, :, keep], p.body[:, :, keep]
    lungs = (p.right_lung | p.left_lung)[:, :, keep]
    assert lungs[:, :, 0].any() and lungs[:, :, -1].any()  # the lungs do touch both borders
    affine = p.affine.copy()
    affine[:3, 3] = (p.affine @ [0, 0, int(np.argmax(keep)), 1])[:3]
    body = segment_body(hu, affine).astype(bool)
    assert (body & lungs).sum() >= 0.99 * lungs.sum()
    outside = ~body_truth
    assert (body & outside).sum() <= 0.02 * outside.sum()
    assert truncated_slices(body) == hu.shape[0]
    # and the lungs model, which looks for air inside the body, finds both
    labels = segment_lungs(hu, affine)
    assert dice(labels == RIGHT_LUNG, p.right_lung[:, :, keep]) > 0.97
    assert dice(labels == LEFT_LUNG, p.left_lung[:, :, keep]) > 0.97
    # the uncropped phantom does not touch the border
    assert truncated_slices(segment_body(p.hu, p.affine).astype(bool)) == 0


def test_body_outline_has_no_specks() -> None:
    """Isolated voxels of tissue density beside the patient (noise, a cable) that reach the
    body through a neighbouring slice do not become contours of their own."""
    from scipy import ndimage

    from inference.algorithms import MIN_BODY_ISLAND_MM2

    p = chest_phantom(slices=12, size=256, pixel_mm=1.0)
    row = p.hu.shape[1] // 2
    edge = int(np.flatnonzero(p.body[0, row])[-1])  # the body's last pixel on that row
    for r in range(row - 40, row + 40, 8):  # noise just outside the skin: a pixel ...
        p.hu[:, r, edge + 2] = 40
        p.hu[::2, r, edge + 1] = 40  # ... that touches the skin on every other slice only
    body = segment_body(p.hu, p.affine).astype(bool)
    pixel_mm2 = 1.0
    for k in range(body.shape[0]):
        labels, count = ndimage.label(body[k])
        sizes = np.bincount(labels.ravel())[1:] * pixel_mm2
        assert count >= 1
        assert (sizes[sizes < sizes.max()] >= MIN_BODY_ISLAND_MM2).all()
    assert dice(body, p.body) > 0.99


def test_components_labelled_in_slabs_are_scipys() -> None:
    """The slab-wise labelling (bounded memory on a 1,000-slice CT) finds exactly scipy's
    6-connected components, also those that cross slab boundaries many times, and the
    largest component is scipy's."""
    from scipy import ndimage

    from inference.algorithms import _components, largest_component

    def _label(mask: np.ndarray, slab: int) -> tuple[np.ndarray, int]:
        found = _components(mask, slab)
        return found.relabel(np.arange(found.count + 1, dtype=np.uint32)), found.count

    rng = np.random.default_rng(7)
    for trial in range(12):
        noise = rng.random((60, 32, 32))
        mask = ndimage.binary_opening(noise > 0.5) if trial % 2 else noise > 0.72
        ref, count = ndimage.label(mask)
        got, found = _label(mask, slab=int(rng.integers(2, 25)))
        assert found == count
        pairs = np.unique(np.stack([ref.ravel(), got.ravel()], axis=1), axis=0)
        assert len(pairs) == count + 1  # one label of ours per label of scipy's, and back
        assert len(np.unique(pairs[:, 1])) == count + 1
    snake = np.zeros((200, 8, 8), dtype=bool)
    snake[:, 2, 2] = True  # one component through every slab boundary
    snake[50:60, 5, 5] = True
    assert _label(snake, slab=7)[1] == 2
    sizes = np.bincount(ndimage.label(snake)[0].ravel())
    assert largest_component(snake).sum() == sizes[1:].max()


def test_the_block_grid_changes_the_answer_by_almost_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a noisy 0.7 mm chest phantom (3x3 pixel blocks; 512 is not a multiple of 3, so
    partial blocks too) the models on the ~2 mm grid and the same models at full resolution
    (one pixel a block) agree to a few voxels in 100,000 for the body and exactly for the
    lungs; both find the truth."""
    import inference.blocks
    from inference.blocks import grid_step
    from inference.training.phantoms import random_chest_phantom

    p = random_chest_phantom(np.random.default_rng(1), slices=24, size=512, pixel_mm=0.7)
    assert grid_step(p.affine) == 3
    body = segment_body(p.hu, p.affine).astype(bool)
    lungs = segment_lungs(p.hu, p.affine)
    monkeypatch.setattr(inference.blocks, "GRID_MM", 0.01)
    assert grid_step(p.affine) == 1
    exact_body = segment_body(p.hu, p.affine).astype(bool)
    exact_lungs = segment_lungs(p.hu, p.affine)
    assert (body ^ exact_body).sum() <= 1e-3 * exact_body.sum()
    assert (lungs != exact_lungs).sum() <= 1e-3 * (exact_lungs > 0).sum()
    assert dice(body, p.body) > 0.999
    assert dice(lungs > 0, p.right_lung | p.left_lung) > 0.97


def test_body_written_into_a_kept_buffer_is_the_body() -> None:
    """segment_body(out=...) (the server model's kept buffer) overwrites whatever the buffer
    held, also for a volume without a body, and refuses a buffer of another shape."""
    p = chest_phantom()
    kept = np.full(p.hu.shape, 7, dtype=np.uint8)
    assert np.array_equal(segment_body(p.hu, p.affine, out=kept), segment_body(p.hu, p.affine))
    air = np.full_like(p.hu, -1000)
    assert not segment_body(air, p.affine, out=kept).any()
    with pytest.raises(ValueError, match="an output of"):
        segment_body(p.hu, p.affine, out=kept[1:])
