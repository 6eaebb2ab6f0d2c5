"""The reconstruction viewer places the region by the affines and writes a valid PNG."""
import struct
import zlib

import nibabel as nib
import numpy as np

from tools.experiments.visualize_reconstruction import main, montage, region_offset


def test_region_is_placed_by_affines_and_png_is_valid(tmp_path):
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    masked = np.zeros((32, 32, 32), np.float32)
    recon = np.ones((16, 16, 16), np.float32)
    recon_affine = affine.copy()
    recon_affine[:3, 3] = affine[:3, :3] @ np.array([8, 4, 12])
    nib.save(nib.Nifti1Image(masked, affine), tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(recon, recon_affine), tmp_path / "r.nii.gz")
    assert region_offset(affine, recon_affine) == (8, 4, 12)
    image = montage(str(tmp_path / "m.nii.gz"), str(tmp_path / "r.nii.gz"))
    assert image.shape == (32, 68)  # two rotated 32×32 panels and a 4-pixel gap
    out = main(str(tmp_path / "m.nii.gz"), str(tmp_path / "r.nii.gz"), out=str(tmp_path / "v.png"))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (68, 32)
    idat_len = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41 : 41 + idat_len])
    pixels = np.frombuffer(rows, np.uint8).reshape(32, 69)[:, 1:]
    np.testing.assert_array_equal(pixels, image)
    assert pixels[:, :32].max() == 0 and pixels[:, 36:].max() == 255  # left all masked, right holds the region
