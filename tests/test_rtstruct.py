"""tools/data/rtstruct_to_nifti.py: DICOM CT series + RTSTRUCT -> image/label NIfTI pair, checked against hand counts.

Every DICOM file here is written by the test with pydicom: a CT series (14 rows x 16 columns, 2 mm pixels, 3 mm
slices, a non-trivial origin, files in shuffled order) and an RTSTRUCT whose contours are rectangles in patient mm.
The rectangles' edges lie between pixel centres, so the voxels inside are counted by hand (a voxel is in when its
centre is). The builders are imported by tests/test_fetch_lung_ct.py.
"""
from __future__ import annotations

import json
import os
import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tools.data import rtstruct_to_nifti as rt

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
ROWS, COLS, SLICES = 14, 16, 8  # rows != columns so that a transposed array is caught
PIXEL = 2.0  # mm between pixel centres, both in-plane directions
STEP = 3.0  # mm between slices
ORIGIN = (-120.5, 35.25, -42.0)  # ImagePositionPatient of the first slice (LPS mm): centre of pixel row 0, column 0
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write(ds: Dataset, path: str) -> str:
    try:
        pydicom.dcmwrite(path, ds, enforce_file_format=True)  # pydicom >= 3
    except TypeError:
        ds.is_little_endian, ds.is_implicit_VR = True, False  # pydicom 2.x
        pydicom.dcmwrite(path, ds, write_like_original=False)
    return path


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def stored_value(row: int, col: int, k: int) -> int:
    """The stored (raw) pixel value of the synthetic series; HU = stored - 1024."""
    return 1000 + 100 * k + 5 * row + col


def make_ct_series(folder, origin=ORIGIN, orientation=AXIAL, n_slices=SLICES, rows=ROWS, cols=COLS,
                   pixel_spacing=(PIXEL, PIXEL), step=STEP, series_uid=None, study_uid=None, frame_uid=None,
                   patient_id="P1", seed=0) -> dict:
    """Write a CT series into ``folder`` (shuffled file order); returns its UIDs and geometry.

    Slice ``k`` lies at ``origin + k * step * normal``, ``normal = row direction x column direction``.
    """
    os.makedirs(folder, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    order = list(range(n_slices))
    random.Random(seed).shuffle(order)  # file names say nothing about the slice order
    sop_uids = [generate_uid() for _ in range(n_slices)]
    for file_index, k in enumerate(order):
        ds = Dataset()
        ds.file_meta = _file_meta(CT_STORAGE, sop_uids[k])
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, sop_uids[k]
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = patient_id, patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = file_index + 1
        ds.ImagePositionPatient = [float(v) for v in np.array(origin) + k * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = float(step)
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        r, c = np.mgrid[:rows, :cols]
        ds.PixelData = stored_value(r, c, k).astype(np.uint16).tobytes()
        _write(ds, os.path.join(folder, f"CT_{file_index:03d}.dcm"))
    return {"series_uid": series_uid, "study_uid": study_uid, "frame_uid": frame_uid, "sop_uids": sop_uids,
            "origin": np.array(origin, float), "row_dir": row_dir, "col_dir": col_dir, "normal": normal,
            "pixel_spacing": pixel_spacing, "step": step, "shape": (cols, rows, n_slices)}


def rectangle(series: dict, k: int, cols: tuple[float, float], rows: tuple[float, float]) -> np.ndarray:
    """Corners (4, 3) in LPS mm of the rectangle spanning column index ``cols`` and row index ``rows`` on slice ``k``.

    The indices are continuous (pixel centres at integers), so ``cols=(2.5, 9.6)`` takes the pixels of columns 3..9.
    """
    def point(c, r):
        return (series["origin"] + c * series["pixel_spacing"][1] * series["row_dir"]
                + r * series["pixel_spacing"][0] * series["col_dir"] + k * series["step"] * series["normal"])

    (c0, c1), (r0, r1) = cols, rows
    return np.array([point(c0, r0), point(c1, r0), point(c1, r1), point(c0, r1)])


def make_rtstruct(path, series: dict, rois: dict, referenced_series_uid=None, contour_sop_uids=None) -> str:
    """Write an RTSTRUCT: ``rois`` is ``{name: [(slice k, (N, 3) LPS points), ...]}`` (several per slice allowed).

    ``referenced_series_uid`` / ``contour_sop_uids`` (per slice) default to the series' own.
    """
    sop_uid = generate_uid()
    sop_uids = contour_sop_uids or series["sop_uids"]
    ds = Dataset()
    ds.file_meta = _file_meta(RTSTRUCT_STORAGE, sop_uid)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTSTRUCT_STORAGE, sop_uid, "RTSTRUCT"
    ds.PatientID = "P1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = series["study_uid"], generate_uid()
    ds.StructureSetLabel = "test"

    def image_ref(uid):
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_STORAGE, uid
        return item

    ref_series = Dataset()
    ref_series.SeriesInstanceUID = referenced_series_uid or series["series_uid"]
    ref_series.ContourImageSequence = Sequence([image_ref(uid) for uid in sop_uids])
    ref_study = Dataset()
    ref_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    ref_study.ReferencedSOPInstanceUID = series["study_uid"]
    ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = series["frame_uid"]
    ref_frame.RTReferencedStudySequence = Sequence([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])

    roi_items, contour_items = [], []
    for number, (name, contours) in enumerate(rois.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm = number, name, "MANUAL"
        roi.ReferencedFrameOfReferenceUID = series["frame_uid"]
        roi_items.append(roi)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = [255, 0, 0]
        sequence = []
        for k, points in contours:
            contour = Dataset()
            contour.ContourImageSequence = Sequence([image_ref(sop_uids[k])])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [round(float(v), 4) for v in np.asarray(points).ravel()]
            sequence.append(contour)
        roi_contour.ContourSequence = Sequence(sequence)
        contour_items.append(roi_contour)
    ds.StructureSetROISequence = Sequence(roi_items)
    ds.ROIContourSequence = Sequence(contour_items)
    return _write(ds, str(path))


# hand counts: GTV = columns 3..10 (8) x rows 4..8 (5) on slices 2..5 (4) = 160 voxels
GTV_COLS, GTV_ROWS, GTV_SLICES = (2.6, 10.3), (3.8, 8.5), range(2, 6)
GTV_COUNT = 8 * 5 * 4
# ring on slice 6: outer columns 2..11 x rows 2..9 (80) minus the hole columns 5..7 x rows 4..6 (9)
RING_COUNT = 10 * 8 - 3 * 3
# body: every pixel of every slice; its edges are the image's own outer voxel edges
BODY_COUNT = COLS * ROWS * SLICES


def standard_rois(series: dict) -> dict:
    return {
        "Body": [(k, rectangle(series, k, (-0.5, COLS - 0.5), (-0.5, ROWS - 0.5))) for k in range(SLICES)],
        "GTV-1": [(k, rectangle(series, k, GTV_COLS, GTV_ROWS)) for k in GTV_SLICES],
        "Ring": [(6, rectangle(series, 6, (1.7, 11.2), (1.9, 9.4))), (6, rectangle(series, 6, (4.6, 7.4), (3.5, 6.5)))],
    }


@pytest.fixture
def case(tmp_path):
    series = make_ct_series(str(tmp_path / "ct"))
    rs = make_rtstruct(tmp_path / "rs.dcm", series, standard_rois(series))
    return {"dir": str(tmp_path / "ct"), "rs": rs, "series": series, "tmp": tmp_path}


def _load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def test_label_counts_affine_and_hu(case):
    out = case["tmp"] / "out"
    summary = rt.convert(case["dir"], case["rs"], ["GTV-1"], str(out / "image.nii.gz"), str(out / "label.nii.gz"))
    image, affine = _load(out / "image.nii.gz")
    label, label_affine = _load(out / "label.nii.gz")
    assert image.shape == label.shape == (COLS, ROWS, SLICES)
    assert int((label == 1).sum()) == GTV_COUNT and set(np.unique(label).tolist()) == {0, 1}
    assert summary["voxels"] == {"GTV-1": GTV_COUNT}
    # exactly the hand-picked voxels: columns 3..10, rows 4..8, slices 2..5
    expected = np.zeros_like(label)
    expected[3:11, 4:9, 2:6] = 1
    np.testing.assert_array_equal(label, expected)
    # NIfTI world is RAS: voxel (0,0,0) is the first slice's ImagePositionPatient with x and y negated
    x, y, z = ORIGIN
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [-x, -y, z, 1])
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [-(x + 2.0), -(y + 4.0), z + 9.0, 1])
    np.testing.assert_allclose(label_affine, affine)
    np.testing.assert_allclose(nib.affines.voxel_sizes(affine), [PIXEL, PIXEL, STEP])
    # HU = stored + RescaleIntercept, voxel (i=column, j=row, k=slice)
    i, j, k = np.meshgrid(np.arange(COLS), np.arange(ROWS), np.arange(SLICES), indexing="ij")
    np.testing.assert_array_equal(image, stored_value(j, i, k) - 1024)
    assert image.dtype == np.int16 and label.dtype == np.uint8


def test_several_rois_are_labels_in_the_order_given_and_holes_are_cut(case):
    out = case["tmp"] / "out"
    summary = rt.convert(case["dir"], case["rs"], ["Ring", "GTV-1"], str(out / "i.nii.gz"), str(out / "l.nii.gz"))
    label, _ = _load(out / "l.nii.gz")
    assert int((label == 1).sum()) == RING_COUNT and int((label == 2).sum()) == GTV_COUNT
    assert label[6, 5, 6] == 0 and label[3, 5, 6] == 1  # the hole (column 6, row 5) and the ring around it
    assert summary["labels"] == {"Ring": 1, "GTV-1": 2}
    # overlap: the ROI given later wins, so the tumour stays visible inside the body
    rt.convert(case["dir"], case["rs"], ["Body", "GTV-1"], str(out / "i.nii.gz"), str(out / "l.nii.gz"))
    label, _ = _load(out / "l.nii.gz")
    assert int((label == 2).sum()) == GTV_COUNT and int((label == 1).sum()) == BODY_COUNT - GTV_COUNT
    # --merge: one binary label, the union
    rt.convert(case["dir"], case["rs"], ["GTV-1", "Ring"], str(out / "i.nii.gz"), str(out / "l.nii.gz"), merge=True)
    label, _ = _load(out / "l.nii.gz")
    assert set(np.unique(label).tolist()) == {0, 1} and int(label.sum()) == GTV_COUNT + RING_COUNT


def test_alternative_roi_names(case):
    out = case["tmp"] / "out"
    summary = rt.convert(case["dir"], case["rs"], ["GTV1|GTV-1"], str(out / "i.nii.gz"), str(out / "l.nii.gz"))
    assert summary["voxels"] == {"GTV-1": GTV_COUNT}


def test_permuted_axes_and_anisotropic_pixels(tmp_path):
    """Rows run along +y, columns along +x, so the normal is -z: slices sort along the normal, not along z."""
    orientation = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    series = make_ct_series(str(tmp_path / "ct"), orientation=orientation, pixel_spacing=(1.5, 2.5),
                            origin=(10, -20, 30))
    rs = make_rtstruct(tmp_path / "rs.dcm", series, {"GTV-1": [(k, rectangle(series, k, GTV_COLS, GTV_ROWS))
                                                               for k in GTV_SLICES]})
    rt.convert(str(tmp_path / "ct"), rs, ["GTV-1"], str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    image, affine = _load(tmp_path / "i.nii.gz")
    label, _ = _load(tmp_path / "l.nii.gz")
    # voxel (i, j, k) sits at origin + 2.5 i (0,1,0) + 1.5 j (1,0,0) + 3 k (0,0,-1) in LPS; RAS negates x and y
    for ijk in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 3, 7)]:
        i, j, k = ijk
        lps = np.array([10 + 1.5 * j, -20 + 2.5 * i, 30 - 3.0 * k])
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)
    i, j, k = np.meshgrid(np.arange(COLS), np.arange(ROWS), np.arange(SLICES), indexing="ij")
    np.testing.assert_array_equal(image, stored_value(j, i, k) - 1024)
    expected = np.zeros_like(label)
    expected[3:11, 4:9, 2:6] = 1
    np.testing.assert_array_equal(label, expected)


def _one_roi_label(tmp_path, contours, series=None, name="ROI"):
    """The label of the one ROI ``name`` made of ``contours`` ([(slice, points), ...]) on the standard series."""
    series = series or make_ct_series(str(tmp_path / "ct"))
    rs = make_rtstruct(tmp_path / "rs.dcm", series, {name: contours})
    summary = rt.convert(str(tmp_path / "ct"), rs, [name], str(tmp_path / "i.nii.gz"), str(tmp_path / "l.nii.gz"))
    label, _ = _load(tmp_path / "l.nii.gz")
    assert summary["voxels"] == {name: int(label.sum())}
    return label


def test_abutting_contours_of_one_roi_are_their_union_with_the_shared_edge(tmp_path):
    """Two rectangles sharing the edge at column 6 (pixel centres on it): the union, column 6 kept (not XOR-ed out)."""
    series = make_ct_series(str(tmp_path / "ct"))
    left = rectangle(series, 3, (2.0, 6.0), (3.6, 7.4))  # columns 2..6 (both edges on centres) x rows 4..7
    right = rectangle(series, 3, (6.0, 10.0), (3.6, 7.4))  # columns 6..10 x rows 4..7
    label = _one_roi_label(tmp_path, [(3, left), (3, right)], series)
    expected = np.zeros((COLS, ROWS, SLICES), np.uint8)
    expected[2:11, 4:8, 3] = 1  # columns 2..10 (9) x rows 4..7 (4) = 36 voxels
    np.testing.assert_array_equal(label, expected)
    assert int(label.sum()) == 9 * 4


def test_duplicated_contour_is_not_a_hole(tmp_path):
    series = make_ct_series(str(tmp_path / "ct"))
    box = rectangle(series, 4, GTV_COLS, GTV_ROWS)  # columns 3..10 x rows 4..8
    label = _one_roi_label(tmp_path, [(4, box), (4, box.copy())], series)
    assert int(label.sum()) == 8 * 5 and label[3:11, 4:9, 4].all()


def test_holes_are_contours_strictly_inside_another_and_keep_their_edge_pixels(tmp_path):
    series = make_ct_series(str(tmp_path / "ct"))
    outer = rectangle(series, 6, (1.7, 11.2), (1.9, 9.4))  # columns 2..11 x rows 2..9: 80
    # a hole whose edges run through pixel centres (columns 5..7, rows 4..6): only the centre (6, 5) is strictly
    # inside it; the 8 pixels on its edge are on the structure's inner boundary and stay in
    hole = rectangle(series, 6, (5.0, 7.0), (4.0, 6.0))
    label = _one_roi_label(tmp_path, [(6, outer), (6, hole)], series)
    assert int(label.sum()) == 80 - 1 and label[6, 5, 6] == 0 and label[5, 4, 6] == 1 and label[7, 6, 6] == 1
    # an island inside a hole inside the outline (depth 2) is filled again: 80 - 9 + 1
    (tmp_path / "rs.dcm").unlink()
    hole = rectangle(series, 6, (4.6, 7.4), (3.5, 6.5))  # columns 5..7 x rows 4..6
    island = rectangle(series, 6, (5.6, 6.4), (4.6, 5.4))  # column 6, row 5
    label = _one_roi_label(tmp_path, [(6, island), (6, outer), (6, hole)], series)
    assert int(label.sum()) == 80 - 9 + 1 and label[6, 5, 6] == 1 and label[5, 5, 6] == 0


@pytest.mark.parametrize("tilt", ["about_z", "about_x"])
def test_truly_oblique_series_rotated_10_degrees(tmp_path, tilt):
    """Direction cosines not along the axes (10 degrees): the affine carries them, the label follows the voxels."""
    c, s = np.cos(np.radians(10)), np.sin(np.radians(10))
    orientation = {"about_z": (c, s, 0.0, -s, c, 0.0), "about_x": (1.0, 0.0, 0.0, 0.0, c, s)}[tilt]
    normal = {"about_z": np.array([0.0, 0.0, 1.0]), "about_x": np.array([0.0, -s, c])}[tilt]
    series = make_ct_series(str(tmp_path / "ct"), orientation=orientation)
    label = _one_roi_label(tmp_path, [(k, rectangle(series, k, GTV_COLS, GTV_ROWS)) for k in GTV_SLICES], series)
    expected = np.zeros_like(label)
    expected[3:11, 4:9, 2:6] = 1  # the rectangles span columns 3..10, rows 4..8 of slices 2..5 in the rotated grid
    np.testing.assert_array_equal(label, expected)
    image, affine = _load(tmp_path / "i.nii.gz")
    # voxel (i, j, k) at ORIGIN + 2 i row + 2 j column + 3 k normal (LPS); RAS negates x and y
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    for i, j, k in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (5, 3, 7)]:
        lps = np.array(ORIGIN) + 2.0 * i * row + 2.0 * j * col + 3.0 * k * normal
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-5)
    from monai.transforms import LoadImage

    itk_image = LoadImage(reader="ITKReader", image_only=True)(str(tmp_path / "ct"))
    np.testing.assert_allclose(np.asarray(itk_image.affine), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(itk_image), image)


def test_geometry_agrees_with_itk_dicom_reader(case):
    """An independent reader (ITK's GDCM series reader through MONAI) gives the same voxels and affine."""
    from monai.transforms import LoadImage

    out = case["tmp"] / "out"
    rt.convert(case["dir"], case["rs"], ["GTV-1"], str(out / "i.nii.gz"), str(out / "l.nii.gz"))
    image, affine = _load(out / "i.nii.gz")
    itk_image = LoadImage(reader="ITKReader", image_only=True)(case["dir"])
    np.testing.assert_allclose(np.asarray(itk_image.affine), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(itk_image), image)


def test_wrong_roi_name_lists_the_names_present(case):
    with pytest.raises(rt.DicomConversionError) as err:
        rt.convert(case["dir"], case["rs"], ["GTV"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))
    message = str(err.value)
    assert "'GTV'" in message and "'GTV-1'" in message and "'Body'" in message and "'Ring'" in message
    assert case["rs"] in message
    assert not (case["tmp"] / "l.nii.gz").exists()


def test_rtstruct_of_another_series_is_refused_naming_both_uids(case):
    other = generate_uid()
    rs = make_rtstruct(case["tmp"] / "other.dcm", case["series"], standard_rois(case["series"]),
                       referenced_series_uid=other)
    with pytest.raises(rt.DicomConversionError) as err:
        rt.convert(case["dir"], rs, ["GTV-1"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))
    assert other in str(err.value) and case["series"]["series_uid"] in str(err.value)


def test_contour_on_an_image_not_in_the_series_is_refused(case):
    foreign = [generate_uid() for _ in range(SLICES)]
    rs = make_rtstruct(case["tmp"] / "other.dcm", case["series"], standard_rois(case["series"]),
                       contour_sop_uids=foreign)
    with pytest.raises(rt.DicomConversionError) as err:
        rt.convert(case["dir"], rs, ["GTV-1"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))
    assert foreign[2] in str(err.value) and case["series"]["series_uid"] in str(err.value)
    assert "GTV-1" in str(err.value)


def test_contour_outside_the_image_is_refused_naming_the_roi_and_distance(case):
    series = case["series"]
    # columns up to COLS - 0.5 + 5 pixels: 5 x 2 mm = 10 mm beyond the outer voxel edge
    rois = {"Far": [(3, rectangle(series, 3, (3.6, COLS - 0.5 + 5), (1.6, 6.4)))], **standard_rois(series)}
    rs = make_rtstruct(case["tmp"] / "far.dcm", series, rois)
    with pytest.raises(rt.DicomConversionError, match=r"'Far'.*10\.0 mm") as err:
        rt.convert(case["dir"], rs, ["Far"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))
    assert rs in str(err.value)
    # the other ROIs of the same file are fine (Body touches the image edge exactly)
    summary = rt.convert(case["dir"], rs, ["Body"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))
    assert summary["voxels"] == {"Body": BODY_COUNT}
    # clip=True keeps the part inside: columns 4..15 x rows 2..6
    summary = rt.convert(case["dir"], rs, ["Far"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"),
                         clip=True)
    assert summary["voxels"] == {"Far": (COLS - 4) * 5}


def test_contour_between_slices_is_refused(case):
    series = case["series"]
    off = rectangle(series, 3, GTV_COLS, GTV_ROWS) + 0.5 * STEP * series["normal"]  # half-way to slice 4
    rs = make_rtstruct(case["tmp"] / "off.dcm", series, {"GTV-1": [(3, off)]})
    with pytest.raises(rt.DicomConversionError, match=r"'GTV-1'.*1\.5 mm.*slice plane"):
        rt.convert(case["dir"], rs, ["GTV-1"], str(case["tmp"] / "i.nii.gz"), str(case["tmp"] / "l.nii.gz"))


def test_empty_and_mixed_folders_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    with pytest.raises(rt.DicomConversionError, match="no DICOM image slices.*empty"):
        rt.read_ct_series(str(tmp_path / "empty"))
    a = make_ct_series(str(tmp_path / "mixed"), n_slices=3, seed=1)
    b = make_ct_series(str(tmp_path / "mixed" / "b"), n_slices=4, seed=2)
    with pytest.raises(rt.DicomConversionError) as err:
        rt.read_ct_series(str(tmp_path / "mixed"))
    assert a["series_uid"] in str(err.value) and b["series_uid"] in str(err.value) and "series_uid" in str(err.value)
    chosen = rt.read_ct_series(str(tmp_path / "mixed"), series_uid=b["series_uid"])
    assert chosen.hu.shape == (COLS, ROWS, 4)


def test_missing_slice_is_refused(tmp_path):
    series = make_ct_series(str(tmp_path / "ct"))
    files = sorted(os.listdir(tmp_path / "ct"))
    for name in files:  # remove the file holding slice 4 (a gap of 6 mm in a 3 mm series)
        ds = pydicom.dcmread(str(tmp_path / "ct" / name), stop_before_pixels=True)
        if ds.SOPInstanceUID == series["sop_uids"][4]:
            os.remove(tmp_path / "ct" / name)
    with pytest.raises(rt.DicomConversionError, match="spacing"):
        rt.read_ct_series(str(tmp_path / "ct"))


def make_patients(root, n=3) -> list[str]:
    """``n`` patient folders under ``root``, each a CT series and its RTSTRUCT side by side (the pycerr layout)."""
    names = []
    for p in range(n):
        folder = os.path.join(str(root), f"pat_{p + 1}")
        series = make_ct_series(folder, origin=(-100.0 + 7 * p, 20.0, -300.0 + 11 * p), patient_id=f"P{p}", seed=p)
        make_rtstruct(os.path.join(folder, "DCM_RS_00000.dcm"), series,
                      {"GTV-1": [(k, rectangle(series, k, GTV_COLS, GTV_ROWS)) for k in GTV_SLICES]})
        names.append(folder)
    return names


def test_datalist_mode_writes_pairs_usable_by_binary_finetune_bundles(tmp_path):
    from hybridmim_components.workflow.input_checks import check_datalist

    patients = make_patients(tmp_path / "patients", 3)
    out = tmp_path / "out"
    path = rt.convert_patients(patients, str(out), ["GTV-1"], val_fraction=0.34, output="datalist_gtv.json")
    assert path == str(out / "datalist_gtv.json")
    datalist = json.loads((out / "datalist_gtv.json").read_text())
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1
    assert datalist["testing"] == [{"image": datalist["validation"][0]["image"]}]
    entries = datalist["training"] + datalist["validation"]
    assert sorted(e["image"] for e in entries) == [f"images/pat_{p}.nii.gz" for p in (1, 2, 3)]
    for entry in entries:
        assert not os.path.isabs(entry["image"]) and not os.path.isabs(entry["label"])
        label, _ = _load(out / entry["label"])
        assert int(label.sum()) == GTV_COUNT
    assert check_datalist(str(out), "datalist_gtv.json", label_values=[0, 1],
                          required_keys=("image", "label"))["files"] == 6


def test_datalist_mode_names_the_patient_without_rtstruct(tmp_path):
    patients = make_patients(tmp_path / "patients", 2)
    os.remove(os.path.join(patients[1], "DCM_RS_00000.dcm"))
    with pytest.raises(rt.DicomConversionError, match="pat_2.*no RTSTRUCT"):
        rt.convert_patients(patients, str(tmp_path / "out"), ["GTV-1"])


def test_command_line(case, capsys):
    out = case["tmp"] / "cli"
    args = ["--series", case["dir"], "--rtstruct", case["rs"], "--roi", "Ring", "--roi", "GTV-1",
            "--image", str(out / "i.nii.gz"), "--label", str(out / "l.nii.gz")]
    assert rt.main(args) == 0
    label, _ = _load(out / "l.nii.gz")
    assert int((label == 2).sum()) == GTV_COUNT and int((label == 1).sum()) == RING_COUNT
    assert rt.main(args[:5] + ["GTV"] + args[6:]) == 1
    assert "'GTV' not found" in capsys.readouterr().err
    patients_root = case["tmp"] / "patients"
    make_patients(patients_root, 2)
    assert rt.main(["--datalist", str(patients_root), "--out_dir", str(out / "many"), "--roi", "GTV-1"]) == 0
    assert (out / "many" / "datalist.json").is_file()
