"""User-supplied segmentation ONNX models as blending masks: the I/O contract and its refusals."""

import numpy as np
import pytest
import torch

from facegen.engine.anonymise.masks import OnnxFaceMask
from facegen.engine.anonymise.photos import blend
from facegen.models.errors import UserError
from tests.engine.segmentation import export_parser


def photos(n=2, side=32):
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.mark.parametrize("single", [False, True])
def test_mask_is_the_models_face_region_resized_and_snapped(tmp_path, single):
    path = export_parser(tmp_path / "parser.onnx", 16, single=single)
    mask = OnnxFaceMask(path, () if single else (1,))(photos())
    assert mask.shape == (2, 1, 32, 32) and mask.dtype == torch.float32
    # The model said face on its left 8 of 16 columns: the left 15 of 32 photo columns are fully face,
    # the right 15 fully not (bilinear upsampling blends only the two columns at the border).
    assert (mask[..., :15] == 1).all() and (mask[..., 17:] == 0).all()
    # Blending keeps every pixel outside the mask exactly; inside it is the rendered face's.
    photo, rendered = photos(), torch.full((2, 3, 32, 32), -1.0)
    out = blend(photo, rendered, mask)
    assert torch.equal(out[..., 17:], photo[..., 17:]) and (out[..., :15] == 0).all()


def test_free_input_size_runs_at_the_photo_resolution_and_classes_add_up(tmp_path):
    mask = OnnxFaceMask(export_parser(tmp_path / "p.onnx", 32, fixed_side=False), (1, 2))(photos())
    assert (mask[..., :16] == 1).all()
    # On the right, classes 0 and 2 share the probability (both score 0): the mask is class 2's half.
    torch.testing.assert_close(mask[..., 16:], torch.full_like(mask[..., 16:], 0.5), atol=1e-3, rtol=0)


def test_bad_models_and_classes_are_one_clear_error(tmp_path):
    parser = export_parser(tmp_path / "parser.onnx", 16)
    with pytest.raises(UserError, match="outputs 3 classes; name the face classes with --mask-classes"):
        OnnxFaceMask(parser)
    with pytest.raises(UserError, match=r"--mask-classes \[3\]: .* has classes 0..2"):
        OnnxFaceMask(parser, (1, 3))
    single = export_parser(tmp_path / "single.onnx", 16, single=True)
    with pytest.raises(UserError, match="single face-probability channel, not classes"):
        OnnxFaceMask(single, (1,))
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable ONNX model"):
        OnnxFaceMask(str(tmp_path / "junk.onnx"), (1,))
    with pytest.raises(UserError, match="file not found"):
        OnnxFaceMask(str(tmp_path / "missing.onnx"), (1,))
    with pytest.raises(UserError, match="mean and std need 3 values"):
        OnnxFaceMask(parser, (1,), mean=(0.5,))
    assert np.isfinite(OnnxFaceMask(parser, (1,))(photos(1)).numpy()).all()
