"""``hybridmim_components.utils.atomic_files``: a file is whole under its name or not there; nothing is left behind."""
from __future__ import annotations

import os

import numpy as np
import pytest

from hybridmim_components.utils.atomic_files import atomic_open, atomic_path, temporary_name


class _Killed(Exception):
    pass


@pytest.mark.parametrize("fsync", [False, True])
def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path, fsync):
    target = tmp_path / "record.json"
    target.write_text("old")
    with pytest.raises(_Killed):
        with atomic_open(target, "w", fsync=fsync) as f:
            f.write("half of the new")
            f.flush()
            assert target.read_text() == "old"  # the reader still sees the old file while the new one is written
            raise _Killed
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["record.json"]


def test_a_complete_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "new" / "folder" / "model.pt"
    with atomic_open(target, "wb", fsync=True) as f:
        f.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01" and os.listdir(target.parent) == ["model.pt"]
    with atomic_open(target, "wb") as f:
        f.write(b"\x02")
    assert target.read_bytes() == b"\x02" and os.listdir(target.parent) == ["model.pt"]


def test_the_temporary_name_is_hidden_beside_the_target_with_its_extensions(tmp_path):
    tmp = temporary_name(tmp_path / "ct_0001.nii.gz")
    assert os.path.dirname(tmp) == str(tmp_path)
    name = os.path.basename(tmp)
    assert name.startswith(".ct_0001.part") and name.endswith(".nii.gz") and str(os.getpid()) in name


def test_a_writer_that_picks_the_format_by_extension_writes_through_atomic_path(tmp_path):
    import nibabel as nib

    target = tmp_path / "image.nii.gz"
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    with atomic_path(target) as tmp:
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp)
    loaded = nib.load(str(target))
    assert np.array_equal(np.asarray(loaded.dataobj), data)
    with open(target, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip: the .gz of the target's name reached nibabel
    assert os.listdir(tmp_path) == ["image.nii.gz"]


def test_a_read_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode must contain 'w' or 'x'"):
        with atomic_open(tmp_path / "x.txt", "r"):
            pass
