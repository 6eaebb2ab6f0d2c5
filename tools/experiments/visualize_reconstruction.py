"""Look at what a pretrained model learned: a PNG of the middle slice of a pretraining bundle's inference output.

    python tools/experiments/visualize_reconstruction.py eval/case_0/case_0_masked.nii.gz \\
        eval/case_0/case_0_reconstruction.nii.gz --out case_0.png

Left: the masked input crop. Right: the same crop with the region replaced by the reconstruction (outlined). The
reconstruction is placed with the two files' affines, as a viewer would overlay them. No plotting library is needed:
the PNG is written with zlib.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib

if __package__ in (None, ""):  # run as a file: make ``tools`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import fire  # noqa: E402

from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from tools.common.pictures import region_offset  # noqa: E402


def write_png(path: str, gray: np.ndarray) -> None:
    """Write an ``H×W`` uint8 array as an 8-bit grayscale PNG."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected an H×W uint8 array, got {gray.dtype} {gray.shape}")
    height, width = gray.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + gray[r].tobytes() for r in range(height))  # filter type 0 per row
    with atomic_open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(rows, 6)))
        f.write(chunk(b"IEND", b""))


def to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((values - low) / max(high - low, 1e-8), 0, 1) * 255).astype(np.uint8)


def montage(masked_path: str, reconstruction_path: str, channel: int = 0) -> np.ndarray:
    """``W×(2H+4)`` uint8 image: masked input | input with the region reconstructed (axial middle slice)."""
    masked_img, recon_img = nib.load(masked_path), nib.load(reconstruction_path)
    masked, recon = np.asarray(masked_img.dataobj, np.float32), np.asarray(recon_img.dataobj, np.float32)
    if masked.ndim == 4:
        masked, recon = masked[..., channel], recon[..., channel]
    start = region_offset(masked_img.affine, recon_img.affine)
    stop = tuple(s + n for s, n in zip(start, recon.shape))
    if any(s < 0 for s in start) or any(e > n for e, n in zip(stop, masked.shape)):
        raise ValueError(f"{reconstruction_path} does not lie inside {masked_path} (offset {start}, shape {recon.shape})")
    filled = masked.copy()
    filled[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = recon
    z = (start[2] + stop[2]) // 2  # the region's middle axial slice
    low, high = np.percentile(masked, [0.5, 99.5])
    left, right = to_uint8(masked[:, :, z], low, high), to_uint8(filled[:, :, z], low, high)
    right[start[0], start[1] : stop[1]] = right[stop[0] - 1, start[1] : stop[1]] = 255  # outline the region
    right[start[0] : stop[0], start[1]] = right[start[0] : stop[0], stop[1] - 1] = 255
    left, right = np.rot90(left), np.rot90(right)  # rows = anterior-posterior, as a viewer shows axial slices
    gap = np.full((left.shape[0], 4), 128, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


def main(masked: str, reconstruction: str, out: str = "reconstruction.png", channel: int = 0) -> str:
    write_png(out, np.ascontiguousarray(montage(masked, reconstruction, channel)))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    fire.Fire(main)
