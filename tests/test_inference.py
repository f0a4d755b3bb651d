"""Inference: model cards, the MONAI runner, and the real tritonserver serving every bundled
model over HTTP, gRPC and system shared memory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from inference.algorithms import segment_lungs
from inference.cards import ModelCard, ModelCardError, load_card, load_cards
from inference.runner import LPS_TO_RAS, preprocess, resample_to_source, run_model
from inference.training.lungnet import HELD_OUT_SEEDS, held_out_phantom
from inference.triton import InferenceClient, InferenceError, LocalTriton
from inference.volume import build_volume
from tests.peers import ROOT, head_ct_files
from tests.raster import dice

CARDS = ROOT / "config" / "models"
warnings.filterwarnings("ignore", category=FutureWarning)


def _tensor_card(**changes: object) -> ModelCard:
    base = load_card(CARDS / "ct-lungs-unet.yaml").model_dump(exclude={"checksum"})
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            base[section] = {**base[section], field: value}
        else:
            base[section] = value
    return ModelCard.model_validate(base)


# -- cards --------------------------------------------------------------------------------------
def test_shipped_cards_describe_input_processing_labels_and_outputs() -> None:
    cards = load_cards(CARDS)
    assert set(cards) >= {"ct-body", "ct-lungs", "ct-lungs-unet"}
    unet = cards["ct-lungs-unet"]
    assert unet.input.mode.value == "patch" and unet.input.patch_size == (64, 64, 64)
    assert unet.preprocessing.orientation == "RAS" and unet.preprocessing.spacing == (4, 4, 4)
    assert unet.preprocessing.intensity is not None
    assert "PROBABILITY_MAP" in unet.outputs
    assert unet.labels[0].type.value == "39607008"  # SNOMED CT lung structure
    # the card reports what it was trained on and its held-out Dice against ct-lungs
    assert "phantom" in str(unet.training["data"])
    assert float(unet.training["dice_vs_ct_lungs_min"]) >= 0.9  # type: ignore[arg-type]
    assert len(unet.checksum) == 64


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input__patch_size": None}, "patch_size is required"),
        ({"input__output_channels": 1}, "cannot hold label 1"),
        ({"preprocessing__orientation": "XYZ"}, "orientation"),
        ({"input__mode": "warp"}, "mode"),
    ],
)
def test_invalid_cards_are_refused_with_the_field(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tensor_card(**change)


def test_two_cards_with_one_name_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.yaml").write_text((CARDS / "ct-body.yaml").read_text())
    with pytest.raises(ModelCardError, match="already defined"):
        load_cards(CARDS, tmp_path / "a")


# -- the runner (MONAI pre/post-processing) with an in-process predictor --------------------------
def test_resampling_back_matches_the_general_affine_path() -> None:
    rng = np.random.default_rng(1)
    small = rng.random((20, 24, 16)).astype(np.float32)
    pre = np.diag([-4.0, 4.0, 3.0, 1.0])
    pre[:3, 3] = [40.0, -50.0, 10.0]
    src = np.array([[0, 0, 1.3, -30], [0, 1.1, 0, -40], [2.5, 0, 0, 12], [0, 0, 0, 1.0]])
    shape = (30, 60, 50)
    fast = resample_to_source(small, pre, src, shape)
    # nudge the affine off-axis by 1e-7: the general (scipy affine_transform) path runs
    tilted = src.copy()
    tilted[0, 1] = 1e-7
    slow = resample_to_source(small, pre, tilted, shape)
    assert np.abs(fast - slow).max() < 1e-4


def test_preprocessing_orients_and_resamples_in_patient_space() -> None:
    """A marker on the patient's left stays on the left (RAS +x is the patient's left? no: RAS
    +x is the patient's right-to-left reversed, so the left is at low x) after Orientation."""
    card = _tensor_card()
    hu = np.full((20, 64, 64), -1000, dtype=np.int16)
    hu[:, 28:36, 50:58] = 500  # high column index = patient's left (+x in LPS)
    affine = np.array([[0, 0, 2.0, -63], [0, 2.0, 0, -63], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    image, pre_affine = preprocess(card, hu, affine)
    peak = np.unravel_index(np.argmax(image[0]), image.shape[1:])
    ras = pre_affine @ [*peak, 1]
    assert ras[0] < 0  # RAS x < 0: towards the patient's left
    back = resample_to_source(image[0], pre_affine, LPS_TO_RAS @ affine, hu.shape)
    assert back[:, 32, 54].mean() > 0.9 and back[:, 32, 10].mean() < 0.05


@pytest.mark.parametrize("mode", ["volume", "slice", "patch"])
def test_dense_modes_give_the_same_labels_with_a_known_predictor(mode: str) -> None:
    """The predictor thresholds the windowed input: every mode must reproduce that threshold
    on the source grid (within resampling at the edges)."""
    card = _tensor_card(
        input__mode=mode,
        input__patch_size=[32, 32, 16] if mode == "patch" else None,
        input__batch_size=3,
        postprocessing__min_component_ml=0.0,
        postprocessing__fill_holes=False,
    )
    level = (-400 + 1000) / 1500  # -400 HU after the card's window

    def predict(batch: np.ndarray) -> np.ndarray:
        air = (level - batch) * 50.0
        return np.concatenate([-air, air], axis=1)  # channel 1 = air

    hu = np.full((30, 64, 64), 40, dtype=np.int16)
    hu[8:22, 16:48, 10:30] = -900
    affine = np.array([[0, 0, 4.0, -126], [0, 4.0, 0, -126], [4.0, 0, 0, 0], [0, 0, 0, 1]])
    out = run_model(card, hu, affine, predict=predict)
    assert out.labels is not None
    assert dice(out.labels == 1, hu < -400) > 0.97
    assert set(out.probabilities) == {1} and out.probabilities[1].dtype == np.uint8


def test_classification_gives_one_score_per_label() -> None:
    card = _tensor_card(
        task="classification",
        input__mode="volume",
        input__patch_size=None,
        input__output_channels=2,
    )
    out = run_model(
        card,
        np.zeros((8, 16, 16), np.int16),
        np.eye(4),
        predict=lambda batch: np.array([[0.0, np.log(3.0)]] * batch.shape[0]),
    )
    assert out.labels is None
    assert out.scores == {"Lungs": pytest.approx(0.75)}


# -- the real tritonserver ---------------------------------------------------------------------


@pytest.mark.integration
def test_every_model_gives_the_same_masks_over_http_grpc_and_shared_memory(
    triton: LocalTriton,
) -> None:
    phantom = held_out_phantom(HELD_OUT_SEEDS[0])
    cards = load_cards(CARDS)
    reference: dict[str, np.ndarray] = {}
    for protocol in ("http", "grpc"):
        for shared in (False, True):
            client = InferenceClient(triton.url(protocol), protocol, shared_memory=shared)
            try:
                for name, card in sorted(cards.items()):
                    labels = run_model(card, phantom.hu, phantom.affine, client=client).labels
                    assert labels is not None and labels.shape == phantom.hu.shape
                    if name in reference:
                        assert np.array_equal(labels, reference[name]), (name, protocol, shared)
                    else:
                        reference[name] = labels
            finally:
                client.close()
    truth = phantom.right_lung | phantom.left_lung
    assert dice(reference["ct-body"] == 1, phantom.body) > 0.97
    assert dice(reference["ct-lungs"] > 0, truth) > 0.95
    assert dice(reference["ct-lungs-unet"] == 1, truth) > 0.9


@pytest.mark.integration
def test_ct_lungs_takes_ct_bodys_body_over_triton_and_gives_the_same_lungs(
    triton: LocalTriton,
) -> None:
    """ct-lungs' card uses ct-body's body: sent as bits (the optional BODY_BITS input), the
    server model takes it instead of computing it again, and the lungs are exactly those it
    finds alone. A body of the wrong shape is refused with the reason, as bytes or as bits."""
    phantom = held_out_phantom(HELD_OUT_SEEDS[0])
    cards = load_cards(CARDS)
    assert cards["ct-lungs"].input.uses is not None
    assert cards["ct-lungs"].input.uses.model == "ct-body"
    client = InferenceClient(triton.url("http"), "http", shared_memory=True)
    try:
        body = run_model(cards["ct-body"], phantom.hu, phantom.affine, client=client).labels
        alone = run_model(cards["ct-lungs"], phantom.hu, phantom.affine, client=client).labels
        given = run_model(
            cards["ct-lungs"], phantom.hu, phantom.affine, client=client, uses=body
        ).labels
        assert alone is not None and given is not None and alone.any()
        assert np.array_equal(given, alone)
        with pytest.raises(InferenceError, match="body mask"):
            client.segment(
                "ct-lungs", phantom.hu, phantom.affine, {"BODY": np.zeros((2, 2, 2), np.uint8)}
            )
        assert cards["ct-lungs"].input.uses.packed
        with pytest.raises(InferenceError, match="packed body mask"):
            bits = np.zeros(phantom.hu.shape, np.uint8)  # bytes where bits are expected
            client.segment("ct-lungs", phantom.hu, phantom.affine, {"BODY_BITS": bits})
        with pytest.raises(ValueError, match="packed output"):  # one lung's bits, not two
            segment_lungs(phantom.hu, phantom.affine, out_bits=np.zeros((1, 2, 2, 2), np.uint8))
    finally:
        client.close()


def test_a_model_that_uses_another_runs_after_it_and_a_cycle_runs_alone() -> None:
    from airouter.jobs.pipeline import _provider_order
    from inference.cards import UsesOutput

    cards = load_cards(CARDS)
    lungs, body = cards["ct-lungs"], cards["ct-body"]
    ordered, chained = _provider_order([lungs, body])
    assert [c.name for c in ordered] == ["ct-body", "ct-lungs"] and chained == {"ct-lungs"}
    ordered, chained = _provider_order([lungs])  # ct-body not in the job: computed inside
    assert [c.name for c in ordered] == ["ct-lungs"] and chained == set()
    looped = body.model_copy(
        update={
            "input": body.input.model_copy(
                update={"uses": UsesOutput(model="ct-lungs", label=1, tensor="X")}
            )
        }
    )
    ordered, chained = _provider_order([lungs, looped])
    assert sorted(c.name for c in ordered) == ["ct-body", "ct-lungs"] and chained == set()


@pytest.mark.integration
def test_network_model_on_held_out_phantom_agrees_with_the_classic_model(
    triton: LocalTriton,
) -> None:
    """Acceptance: Dice >= 0.9 against ct-lungs on a phantom never seen in training (seed and
    grid differ from the training set's), through Triton; and the card says the same."""
    cards = load_cards(CARDS)
    client = InferenceClient(triton.url("grpc"), "grpc", shared_memory=True)
    try:
        phantom = held_out_phantom(HELD_OUT_SEEDS[1])
        classic = segment_lungs(phantom.hu, phantom.affine) > 0
        out = run_model(cards["ct-lungs-unet"], phantom.hu, phantom.affine, client=client)
        assert out.labels is not None
        score = dice(out.labels == 1, classic)
        assert score >= 0.9, score
        recorded = cards["ct-lungs-unet"].training["dice_vs_ct_lungs"]
        assert abs(score - recorded[1]) < 0.01  # type: ignore[index]
        # the probability map is high inside the lungs and low outside
        prob = out.probabilities[1]
        assert prob[classic].mean() > 200 and prob[~classic].mean() < 20
        # a head CT (air inside a skull) has no lungs for the network either: an empty result
        head = build_volume(head_ct_files())
        empty = run_model(cards["ct-lungs-unet"], head.hu, head.affine, client=client)
        assert empty.labels is not None and not empty.labels.any()
    finally:
        client.close()


@pytest.mark.integration
def test_a_model_error_carries_the_servers_message(triton: LocalTriton) -> None:
    client = InferenceClient(triton.url("http"))
    with pytest.raises(InferenceError, match="ct-lungs-unet"):
        # two channels where the network takes one: the model fails, the server says why
        client.infer(
            "ct-lungs-unet",
            {"INPUT__0": np.zeros((1, 2, 16, 16, 16), np.float32)},
            {"OUTPUT__0": (np.dtype(np.float32), (1, 2, 16, 16, 16))},
        )
    assert client.is_ready("ct-lungs-unet")  # the model still serves the next request


def test_card_checksum_follows_the_file(tmp_path: Path) -> None:
    text = (CARDS / "ct-body.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text)
    data = yaml.safe_load(text)
    data["version"] = "1.0.1"
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(data))
    assert load_card(tmp_path / "a.yaml").checksum != load_card(tmp_path / "b.yaml").checksum


def test_readiness_is_false_for_a_server_down_and_a_bug_is_raised() -> None:
    """A server that cannot be reached is "not ready" (jobs wait); anything else is a bug the
    job must fail with, not wait on."""
    from tests.peers import free_port

    for protocol in ("http", "grpc"):
        client = InferenceClient(f"127.0.0.1:{free_port()}", protocol, request_timeout_s=2.0)
        assert client.is_ready() is False
        assert client.is_ready("ct-body") is False

    class Broken:
        def is_server_ready(self) -> bool:
            raise TypeError("a bug in the client code")

    client = InferenceClient(f"127.0.0.1:{free_port()}")
    client._client = Broken()
    with pytest.raises(TypeError, match="a bug"):
        client.is_ready()


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses process ``pid`` listens on, read from the kernel (/proc)."""
    import ipaddress
    import os

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/net/{table}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                host, port = local.split(":")
                raw = bytes.fromhex(host)
                # /proc prints each 32-bit word in host (little-endian) order
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(raw if size == 16 else raw[:4])
                found.add((str(address), int(port, 16)))
    return found


def test_the_local_triton_listens_on_loopback_only(triton: LocalTriton) -> None:
    """Its HTTP and gRPC ports (model control, repository index, shared-memory registration)
    are reachable from this host only."""
    import ipaddress

    assert triton.process is not None
    listening = _listening(triton.process.pid)
    ports = {port for _, port in listening}
    assert {triton.http_port, triton.grpc_port} <= ports, listening

    def loopback(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on ::ffff:127.0.0.1
        return (mapped or ip).is_loopback

    assert all(loopback(a) for a, _ in listening), listening


def test_shared_memory_regions_are_private_to_the_node(triton: LocalTriton) -> None:
    """The tensors' POSIX shared-memory regions can be read and written by our user only."""
    import os
    import stat

    client = InferenceClient(triton.url("http"), shared_memory=True)
    try:
        path = f"/dev/shm/{client._region('input', 4096).name}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        client.close()
    assert not os.path.exists(path)  # closed: gone


def test_a_jobs_regions_are_kept_for_the_next_job_and_freed_when_idle(triton: LocalTriton) -> None:
    """A clone (one per job and thread) gives its regions back when it closes, still
    registered; the next clone, made in another thread, writes into the same regions and gets
    the same answer. close_idle frees those left unused, and the first client's close the
    rest."""
    import os
    import threading

    phantom = held_out_phantom(HELD_OUT_SEEDS[0])
    client = InferenceClient(triton.url("http"), shared_memory=True)
    answers: list[np.ndarray] = []
    names: list[set[str]] = []

    def job() -> None:  # a worker thread: its own connection, as the pipeline's
        own = client.clone()
        try:
            answers.append(own.segment("ct-body", phantom.hu, phantom.affine))
            names.append({r.name for r in own._regions.values()})
        finally:
            own.close()

    try:
        for _ in range(2):
            worker = threading.Thread(target=job)
            worker.start()
            worker.join()
        assert len(answers) == 2 and answers[0].any()
        assert np.array_equal(answers[0], answers[1])
        assert names[0] == names[1] and len(names[0]) == 3  # CT, AFFINE, LABELS
        assert all(os.path.exists(f"/dev/shm/{n}") for n in names[0])
        assert client.close_idle(600.0) == 0  # just used: kept
        assert client.close_idle(0.0) == 3
        assert not any(os.path.exists(f"/dev/shm/{n}") for n in names[0])
        job()  # new regions, registered afresh
        assert np.array_equal(answers[2], answers[0])
        assert names[2].isdisjoint(names[0])
    finally:
        client.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names[-1])


def test_ct_body_answers_each_volume_in_its_kept_buffer(triton: LocalTriton) -> None:
    """ct-body keeps its answer's buffer between requests: volumes of one shape in turn each
    get their own body (the one computed in this process), never the previous one's."""
    from inference.algorithms import segment_body
    from inference.training.phantoms import random_chest_phantom

    volumes = [random_chest_phantom(np.random.default_rng(seed)) for seed in (11, 12)]
    assert volumes[0].hu.shape == volumes[1].hu.shape
    expected = [segment_body(v.hu, v.affine) for v in volumes]
    assert not np.array_equal(expected[0], expected[1])
    client = InferenceClient(triton.url("http"), shared_memory=True)
    try:
        for n in (0, 1, 0):
            got = client.segment("ct-body", volumes[n].hu, volumes[n].affine)
            assert np.array_equal(got, expected[n])
    finally:
        client.close()


def test_a_volume_built_in_a_lent_buffer_goes_to_triton_by_name(triton: LocalTriton) -> None:
    """The job's volume is built straight into a shared-memory region (InferenceClient.buffers):
    a request names that region instead of copying the CT into another one, the labels can be
    written by the server into another such buffer, and the answers are those of a plain
    array; after the job the region is kept for the next one, and a
    client without shared memory hands out plain arrays."""
    import os

    phantom = held_out_phantom(HELD_OUT_SEEDS[0])
    client = InferenceClient(triton.url("http"), shared_memory=True)
    try:
        expected = client.segment("ct-body", phantom.hu, phantom.affine)
        copied_into = client._regions["in_CT"].name
        with client.buffers() as allocate:
            hu = allocate(phantom.hu.shape, np.int16)
            hu[...] = phantom.hu
            lent = client._pool.holding(hu)
            assert lent is not None and os.path.exists(f"/dev/shm/{lent.name}")
            own = client.clone()
            try:
                got = own.segment("ct-body", hu, phantom.affine)
                assert "in_CT" not in own._regions  # named, not copied
                written = own.segment("ct-body", hu, phantom.affine, allocate=allocate)
                assert client._pool.holding(written) is not None  # the server wrote it there
                assert "out_LABELS" in own._regions  # only the first request used one
            finally:
                own.close()
            assert np.array_equal(got, expected) and np.array_equal(written, expected)
            assert lent.name != copied_into
        assert client._pool.holding(hu) is None
        kept = client._pool.take(hu.nbytes)  # back among the kept regions
        assert kept is not None and kept.name == lent.name
        client._pool.give(kept)
    finally:
        client.close()
    plain = InferenceClient(triton.url("http"), shared_memory=False)
    with plain.buffers() as allocate:
        assert allocate((2, 3), np.int16).shape == (2, 3)
    plain.close()


def test_a_small_tensor_does_not_take_a_large_kept_region() -> None:
    """The pool lends the smallest region that fits and is not much larger."""
    from inference.triton import _Region, _RegionPool

    pool = _RegionPool()
    large, small = _Region("large", None, 500 << 20), _Region("small", None, 4096)
    pool.give(large)
    assert pool.take(128) is None  # only the 500 MB one is free: a new region instead
    pool.give(small)
    assert pool.take(128) is small
    assert pool.take(200 << 20) is large  # a 200 MB volume reuses the 500 MB region
    assert pool.take(1) is None


# -- tensors by reference -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("refs", "message"),
    [
        ("not json", "not JSON"),
        ('{"inputs": {}, "extra": {}}', "'inputs' and 'outputs' only"),
        (
            '{"inputs": {"CT": {"region": "../etc/passwd", "shape": [1], "dtype": "<i2"}}}',
            "not one",
        ),
        ('{"inputs": {"CT": {"region": "triton_x", "shape": [1], "dtype": "<i2"}}}', "not one"),
        ('{"inputs": {"CT": {"region": "airouter_1", "shape": [-1], "dtype": "<i2"}}}', "shape"),
        ('{"inputs": {"CT": {"region": "airouter_1", "shape": [1], "dtype": "<f8"}}}', "type"),
        ('{"outputs": {"LABELS": "airouter_1"}}', "an object"),
    ],
)
def test_a_reference_that_is_not_to_a_region_of_the_node_is_refused(
    refs: str, message: str
) -> None:
    """The stub maps only regions named as the node's client names them, with a shape and a
    type it knows: never a path, never another program's region."""
    from inference.serving.python_model import RefError, read_refs

    with pytest.raises(RefError, match=message):
        read_refs(refs)


def test_a_region_is_mapped_in_place_and_a_short_or_missing_one_is_refused() -> None:
    """map_region reads and writes the region itself (what the node wrote, the model reads;
    what the model writes, the node reads), and refuses a region smaller than the array, a
    missing one and a link."""
    import os

    from inference.serving.python_model import Ref, RefError, map_region

    name = f"airouter_test_{os.getpid()}"
    path, link = f"/dev/shm/{name}", f"/dev/shm/{name}_link"
    values = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    try:
        with open(path, "wb") as f:
            f.write(values.tobytes())
        with map_region(Ref(name, (2, 3, 4), np.dtype(np.int16)), writable=False) as seen:
            assert np.array_equal(seen, values) and not seen.flags.writeable
        with map_region(Ref(name, (48,), np.dtype(np.uint8)), writable=True) as target:
            target[:2] = 7
        assert np.fromfile(path, dtype=np.uint8)[:3].tolist() == [7, 7, 1]
        with (
            pytest.raises(RefError, match="has 48 bytes, not 96"),
            map_region(Ref(name, (48,), np.dtype(np.int16)), writable=False),
        ):
            pass
        with (
            pytest.raises(RefError, match="No such file"),
            map_region(Ref(name + "_gone", (1,), np.dtype(np.uint8)), writable=False),
        ):
            pass
        os.symlink(path, link)
        with (
            pytest.raises(RefError, match=f"region {name}_link"),
            map_region(Ref(name + "_link", (1,), np.dtype(np.uint8)), writable=False),
        ):
            pass
    finally:
        for p in (path, link):
            if os.path.lexists(p):
                os.unlink(p)


def _backend_pools(before: set[str]) -> int:
    """Bytes of the Python backend's own shared-memory pools made since ``before``."""
    import os

    names = {n for n in os.listdir("/dev/shm") if n.startswith("triton_python_backend")}
    return sum(os.stat(f"/dev/shm/{n}").st_size for n in names - before)


def test_classic_models_read_and_write_the_nodes_regions_without_a_copy(tmp_path: Path) -> None:
    """A volume built in a lent region goes to ct-body and ct-lungs by reference (REFS): the
    models map the node's regions, read the CT and ct-body's body (as bits) there and write
    their labels into the job's buffers. Their answers are those computed in this process,
    and the Python backend's own shared memory never grows to hold the CT (it does when the
    same CT goes as a tensor). A reference the model cannot map is refused with the reason.
    The server loads only the models it is told to (explicit model control) and the others
    when the client asks; a model it does not have is refused, not raised."""
    import os
    import shutil

    from inference.algorithms import segment_body
    from inference.triton import MODEL_REPOSITORY

    repository = tmp_path / "models"
    for model in ("ct-body", "ct-lungs"):
        shutil.copytree(MODEL_REPOSITORY / model, repository / model)
    before = {n for n in os.listdir("/dev/shm") if n.startswith("triton_python_backend")}
    server = LocalTriton(tmp_path / "triton", model_repositories=[repository], models=["ct-body"])
    server.start()
    phantom = held_out_phantom(HELD_OUT_SEEDS[0])
    cards = load_cards(CARDS)
    client = InferenceClient(server.url("http"), "http", shared_memory=True)
    try:
        client.wait_ready(["ct-body"], 120)
        assert not client.is_ready("ct-lungs")  # in the repository, not loaded
        assert client.load("ct-lungs") and client.is_ready("ct-lungs")
        assert not client.load("no-such-model")
        body_expected = segment_body(phantom.hu, phantom.affine)
        lungs_expected = segment_lungs(phantom.hu, phantom.affine, body=body_expected)
        assert phantom.hu.nbytes > 4 * _backend_pools(before)  # the pools start small
        with client.buffers() as allocate:
            hu = allocate(phantom.hu.shape, np.int16)
            hu[...] = phantom.hu
            body = run_model(
                cards["ct-body"], hu, phantom.affine, client=client, allocate=allocate
            ).labels
            lungs = run_model(
                cards["ct-lungs"], hu, phantom.affine, client, uses=body, allocate=allocate
            )
            bits = lungs.label_bits  # ct-lungs' card: labels_as_bits
            assert body is not None and lungs.labels is None and bits is not None
            assert client._pool.holding(body) is not None  # written in the job's buffers
            assert client._pool.holding(bits) is not None
            assert bits.shape == (2, *hu.shape[:2], -(-hu.shape[2] // 8))
            assert np.array_equal(body, body_expected)
            columns = hu.shape[2]
            for value in (1, 2):
                unpacked = np.unpackbits(bits[value - 1], axis=-1, count=columns).view(bool)
                assert np.array_equal(unpacked, lungs_expected == value)
                assert unpacked.any()
            assert client._pool.by_reference == {"ct-body": True, "ct-lungs": True}
            assert set(client._regions) == {"in_AFFINE"}  # only the affine copied
        assert phantom.hu.nbytes > 4 * _backend_pools(before)  # the CT never went there
        copied = client.segment("ct-body", phantom.hu, phantom.affine)  # a plain array
        assert np.array_equal(copied, body_expected)
        assert _backend_pools(before) >= phantom.hu.nbytes  # as a tensor it does

        grpc = InferenceClient(server.url("grpc"), "grpc", shared_memory=True)
        try:  # the same over gRPC
            with grpc.buffers() as allocate:
                hu = allocate(phantom.hu.shape, np.int16)
                hu[...] = phantom.hu
                body = grpc.segment("ct-body", hu, phantom.affine, allocate=allocate)
                assert grpc._pool.holding(body) is not None
                assert np.array_equal(body, body_expected)
                assert grpc._pool.by_reference == {"ct-body": True}
        finally:
            grpc.close()

        import tritonclient.http as httpclient

        refs = {"inputs": {"CT": {"region": "airouter_gone", "shape": [2], "dtype": "<i2"}}}
        tensors = [httpclient.InferInput("REFS", [1], "BYTES")]
        tensors[0].set_data_from_numpy(np.array([json.dumps(refs).encode()], dtype=np.object_))
        tensors.append(httpclient.InferInput("AFFINE", [4, 4], "FP64"))
        tensors[1].set_data_from_numpy(np.eye(4))
        raw = httpclient.InferenceServerClient(server.url("http"))
        with pytest.raises(Exception, match="RefError: region airouter_gone: No such file"):
            raw.infer("ct-body", tensors)
        raw.close()
    finally:
        client.close()
        server.stop()


def test_a_new_region_is_faulted_in_before_it_is_lent(tmp_path: Path) -> None:
    """A region made for a job's buffer has its pages in memory when the buffer is lent
    (faulted from several threads at once: the volume built in it then writes to pages
    that exist); one taken back from the pool is the same region, not a new one."""
    import os

    from inference.triton import populate

    client = InferenceClient("127.0.0.1:9", "http", shared_memory=True)  # no server needed
    try:
        with client.buffers() as allocate:
            volume = allocate((40, 512, 512), np.int16)  # 20 MB
            region = client._pool.holding(volume)
            assert region is not None
            stored = os.stat(f"/dev/shm/{region.name}").st_blocks * 512
            assert stored >= volume.nbytes  # every page there, none written by us
            assert not volume.any()  # a new region reads as zeros
        with client.buffers() as allocate:
            again = allocate((40, 512, 512), np.int16)
            assert client._pool.holding(again) is region  # kept: nothing to fault in
        plain = np.frombuffer(bytearray(8 << 20), np.uint8)
        assert populate(plain, threads=3)  # any writable mapping
        assert not populate(plain[: 1 << 10])  # too small to be worth threads
    finally:
        client.close_idle(-1)
        client.close()
