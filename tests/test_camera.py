"""Camera packing against the reference tensors, the crop transform, intrinsics forms, incremental == whole."""

import json

import numpy as np
import pytest
import torch
from conftest import fixture_params
from PIL import Image
from safetensors.torch import load_file

from engine.camera import (
    crop_geometry,
    crop_intrinsics,
    num_latent_frames,
    pack_camera_range,
    pixel_span,
    prepare_camera,
    prepare_image,
    relative_to_first,
    snap_num_frames,
)
from engine.controls import action_to_c2w
from engine.errors import InputError

CAMERA = fixture_params("camera.safetensors")


def _load(path):
    return load_file(str(path)), json.loads(path.with_suffix(".json").read_text())


@pytest.mark.parametrize("path", CAMERA)
def test_crop_matches_reference(path):
    tensors, cfg = _load(path)
    assert cfg["target_sizes"]
    for t in cfg["target_sizes"]:
        k = t["key"]
        g = crop_geometry(tuple(t["src_size"]))
        assert list(g.resized_size) == tensors[f"{k}.resized_size"].tolist(), k
        assert list(g.crop_offset) == tensors[f"{k}.crop_offset"].tolist(), k
        out = crop_intrinsics(tensors[f"{k}.intrinsics_in"].numpy(), g)
        np.testing.assert_allclose(out, tensors[f"{k}.intrinsics_out"].numpy(), atol=1e-4, rtol=0, err_msg=k)


@pytest.mark.parametrize("path", CAMERA)
def test_packing_matches_reference(path):
    tensors, _ = _load(path)
    preps = sorted({k.split(".")[0] for k in tensors if k.startswith("prep")})
    assert preps
    for k in preps:
        size = tuple(tensors[f"{k}.target_size"].tolist())
        out = prepare_camera(tensors[f"{k}.c2w"], tensors[f"{k}.intrinsics"], size)
        for name in ("camera_conditions", "chunk_plucker"):
            ref = tensors[f"{k}.{name}"]
            assert out[name].dtype == torch.float32 and out[name].shape == ref.shape, (k, name)
            assert (out[name] - ref).abs().max().item() <= 1e-5, (k, name)


@pytest.mark.parametrize("path", CAMERA)
def test_incremental_chunks_equal_whole_trajectory(path):
    tensors, _ = _load(path)
    for k in sorted({k.split(".")[0] for k in tensors if k.startswith("prep")}):
        size = tuple(tensors[f"{k}.target_size"].tolist())
        c2w, intr = tensors[f"{k}.c2w"], tensors[f"{k}.intrinsics"]
        whole = prepare_camera(c2w, intr, size)
        rel = relative_to_first(c2w)
        t_lat = num_latent_frames(c2w.shape[0])
        start = 0
        for count in [1, 2, 3, 3, 3, 3, 3, 3]:  # an anchor-first schedule, clipped at the end
            count = min(count, t_lat - start)
            if count <= 0:
                break
            first_px, last_px = pixel_span(start, count)
            last_px = min(last_px, c2w.shape[0] - 1)
            part = pack_camera_range(rel[first_px:last_px + 1], intr[first_px:last_px + 1], size, start, count,
                                     pixel_offset=first_px, num_frames=c2w.shape[0])
            for name in ("camera_conditions", "chunk_plucker"):
                sl = whole[name][start:start + count] if name == "camera_conditions" else \
                    whole[name][:, start:start + count]
                assert torch.equal(part[name], sl), (k, name, start)
            start += count
        assert start == t_lat


def test_live_chunks_from_integrator_poses():
    """The streaming schedule (4 latent frames, then 3) packs each chunk from that chunk's poses only."""
    c2w = action_to_c2w("w-20,jw-30,ik-10,l-13", "v2")  # 74 poses -> 73 + 1 = F
    f = 8 * 9 + 1
    c2w = c2w[:f]
    intr = torch.tensor([[600.0, 600.0, 640.0, 352.0]]).expand(f, 4)
    whole = prepare_camera(c2w, intr, (704, 1280))
    rel = torch.from_numpy(c2w)
    chunks = [(0, 4), (4, 3), (7, 3)]
    for start, count in chunks:
        lo, hi = pixel_span(start, count)
        part = pack_camera_range(rel[lo:hi + 1], intr[lo:hi + 1], (704, 1280), start, count, pixel_offset=lo)
        assert torch.equal(part["chunk_plucker"], whole["chunk_plucker"][:, start:start + count])
        assert torch.equal(part["camera_conditions"], whole["camera_conditions"][start:start + count])


def test_intrinsics_forms():
    k4 = [500.0, 510.0, 320.0, 240.0]
    k33 = [[500.0, 0, 320.0], [0, 510.0, 240.0], [0, 0, 1]]
    c2w = action_to_c2w("w-8", "v1")
    a = prepare_camera(c2w, k4, (128, 192))
    b = prepare_camera(c2w, np.array(k33), (128, 192))
    c = prepare_camera(c2w, np.tile(np.array(k4), (20, 1)), (128, 192))
    d = prepare_camera(c2w, np.tile(np.array(k33), (1, 1, 1)), (128, 192))
    for x in (b, c, d):
        assert torch.equal(a["chunk_plucker"], x["chunk_plucker"])
    # 1 < F' < F resamples linearly per entry
    two = np.array([[500.0, 500.0, 320.0, 240.0], [700.0, 700.0, 320.0, 240.0]])
    e = prepare_camera(c2w, two, (128, 192))
    assert e["camera_conditions"][0, 16] < e["camera_conditions"][1, 16]
    for bad, needle in [([1.0, 2.0, 3.0], "shape"), ([0.0, 1.0, 1.0, 1.0], "focal"),
                        ([np.nan, 1.0, 1.0, 1.0], "non-finite"), ([-5.0, 5.0, 1.0, 1.0], "focal")]:
        with pytest.raises(InputError, match=needle):
            prepare_camera(c2w, bad, (128, 192))
    with pytest.raises(InputError, match="multiple"):
        prepare_camera(c2w, k4, (100, 192))
    with pytest.raises(InputError, match=r"\[F, 4, 4\]"):
        prepare_camera(np.eye(4), k4, (128, 192))


def test_prepare_image_crop_and_range(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 1000, 3), dtype=np.uint8))
    pixels, k, geom = prepare_image(img, [800.0, 800.0, 500.0, 250.0], (704, 1280))
    assert pixels.shape == (1, 3, 704, 1280) and pixels.min() >= -1 and pixels.max() <= 1
    assert k.tolist() == pytest.approx([1126.4, 1126.4, 640.0, 352.0], rel=1e-6)
    with pytest.raises(InputError, match="principal point"):
        prepare_image(img, [800.0, 800.0, 1500.0, 250.0])
    with pytest.raises(InputError, match="cannot read"):
        prepare_image(tmp_path / "missing.png", [800.0, 800.0, 500.0, 250.0])


@pytest.mark.parametrize("n, upper, want", [(13, 13, 9), (46, 46, 41), (161, 161, 161), (12, 100, 9),
                                            (13, 100, 17), (5, 100, 9), (5, 8, 1)])
def test_snap(n, upper, want):
    assert snap_num_frames(n, upper) == want
