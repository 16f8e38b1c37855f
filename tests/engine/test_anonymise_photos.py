"""Projection into W+ and the photo pieces (mask, blend, loading)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from facegen.engine.anonymise.faces import face_ws
from facegen.engine.anonymise.photos import PhotoSettings, blend, ellipse_mask, list_photos, load_photos
from facegen.engine.anonymise.project import ProjectionSettings, project, psnr
from facegen.engine.seeding import Stream
from facegen.models.errors import UserError
from facegen.models.generator import images_to_uint8
from tests.engine.planted import planted_pair

# What 40 Adam steps from the average face reach on the 16² test generator (measured 34.3-36.4 dB;
# the average face itself is at 18.2-18.8 dB).
PROJECTION_PSNR_DB = 30.0


@pytest.mark.slow
def test_projection_recovers_an_image_generated_from_a_known_wplus():
    torch.set_num_threads(2)
    space, embedder = planted_pair()
    ws = face_ws(space, 3, Stream.SWAP_SOURCE, np.arange(2))
    with torch.no_grad():
        photos = images_to_uint8(space.render_w_plus(ws)[0])
    _, start = project(space, embedder, photos, ProjectionSettings(steps=0))
    found, quality = project(space, embedder, photos, ProjectionSettings(steps=40, learning_rate=0.1))
    assert found.shape == ws.shape
    assert (quality >= PROJECTION_PSNR_DB).all(), quality
    assert (start < PROJECTION_PSNR_DB - 8).all(), start  # the average face is far from both
    with torch.no_grad():
        again = images_to_uint8(space.render_w_plus(found)[0])
    np.testing.assert_array_equal(psnr(again, photos), quality)


def test_psnr_values():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[1] = 10
    assert psnr(a, b)[0] == np.inf
    assert psnr(a, b)[1] == pytest.approx(10 * np.log10(255**2 / 100))


def test_ellipse_mask_and_blend():
    settings = PhotoSettings()
    mask = ellipse_mask(32, settings)
    assert mask.shape == (1, 1, 32, 32)
    assert mask[0, 0, 17, 16] == 1.0 and mask[0, 0, 0, 0] == 0.0 and mask[0, 0, 31, 31] == 0.0
    assert ((mask > 0) & (mask < 1)).any()  # feathered
    photos = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    rendered = torch.full((1, 3, 32, 32), -1.0)  # black face
    out = blend(photos, rendered, mask)
    assert out[0, :, 0, 0].tolist() == [200] * 3 and out[0, :, 17, 16].tolist() == [0] * 3
    assert torch.equal(blend(photos, rendered, torch.zeros_like(mask)), photos)


def test_photos_are_centre_cropped_and_resized(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black
    Image.fromarray(wide).save(tmp_path / "b.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not a photo")
    paths = list_photos(tmp_path)
    assert [p.name for p in paths] == ["a.jpg", "b.png"]
    photos = load_photos(paths, 16)
    assert photos.shape == (2, 3, 16, 16) and photos.dtype == torch.uint8
    assert (photos[1] == 255).all() and (photos[0] == 7).all()
    (tmp_path / "c.png").write_bytes(b"broken")
    with pytest.raises(UserError, match="not a readable image"):
        load_photos(list_photos(tmp_path), 16)
    with pytest.raises(UserError, match="not a folder"):
        list_photos(tmp_path / "missing")
