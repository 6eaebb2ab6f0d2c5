"""Convert a DICOM CT series + a DICOM RTSTRUCT into an image/label NIfTI pair in the CT's own geometry.

Clinical segmentation data usually arrives as a CT series (one DICOM file per slice) and an RTSTRUCT holding the
outlined structures (ROIs) as closed polygons in patient millimetres. This tool writes

* the image exactly as the series: voxel ``(i, j, k)`` = pixel column ``i``, pixel row ``j`` of the ``k``-th slice
  along the slice normal (``ImageOrientationPatient`` row x column direction); spacing ``PixelSpacing`` and the
  distance between slices; origin the first slice's ``ImagePositionPatient``; values in HU
  (``stored * RescaleSlope + RescaleIntercept``, int16 when whole numbers, else float32). DICOM patient space is LPS,
  NIfTI world space is RAS, so the affine written is ``diag(-1, -1, 1, 1) @ affine_LPS``.
* the label: the ROIs named with ``--roi`` get the values 1..K in the order given (where they overlap the later one
  wins, so name an enclosing structure before what lies inside it), or one binary label with ``--merge``. A voxel is
  inside a contour when its centre is inside or on the polygon. Several contours of one ROI on the same slice: a
  contour lying strictly inside another (every point inside it, none on it) is a hole in it (its inside is cleared,
  the voxels on it stay), an island in a hole is filled again, and all others are united, so abutting or duplicated
  contours never cancel (plain XOR would drop their shared edge, or the whole duplicated contour).
* any orientation: the contours are mapped into the series' own voxel grid, so oblique series (direction cosines off
  the axes) are rasterised in their own slice planes.

Rasteriser: ``skimage.draw.polygon`` for the interior (scikit-image, maintained, its dependencies numpy/scipy/pillow
already come with this project), plus the voxels whose centre lies on an edge (within 0.001 voxel). rt-utils was not
taken: it pulls in OpenCV (~60 MB), has had no release since 2023, and loads the series itself, which would leave the
geometry and the error messages to it.

Checks, each failing with the culprit named: the ROI name (the names present are listed), the RTSTRUCT's referenced
series (``ReferencedSeriesInstanceUID``) and the images its contours reference (``ReferencedSOPInstanceUID``)
against the series, the frame of reference, contours outside the image (ROI, slice and how many mm beyond the outer
voxel edge; ``--clip`` keeps the part inside instead), contours between slice planes, an empty folder, several
series in one folder (pick one with ``--series_uid``), differing slice sizes/orientations, missing slices.

Command line::

    # one patient
    python tools/data/rtstruct_to_nifti.py --series CT_DIR --rtstruct RS.dcm --roi GTV-1 \\
        --image out/image.nii.gz --label out/label.nii.gz
    python tools/data/rtstruct_to_nifti.py ... --roi Lung_L --roi Lung_R            # labels 1 and 2
    python tools/data/rtstruct_to_nifti.py ... --roi Lung_L --roi Lung_R --merge    # one binary label
    python tools/data/rtstruct_to_nifti.py ... --roi "GTV-1|GTV1"                   # whichever name the file has
    # many patients: every subfolder of PATIENTS holds one CT series and one RTSTRUCT (any depth)
    python tools/data/rtstruct_to_nifti.py --datalist PATIENTS --out_dir OUT --roi GTV-1 [--val_fraction 0.25]

The ``--datalist`` mode writes ``OUT/images/<patient>.nii.gz``, ``OUT/labels/<patient>.nii.gz`` and an MSD-form
``OUT/datalist.json`` (paths relative to ``OUT``; a seeded validation split as ``tools/data/prepare_datalist.py`` makes;
``testing`` = the validation images) that the binary finetune bundles (``hybridmim_*_msd_spleen``) read with
``dataset_dir=OUT``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from hybridmim_components.utils.atomic_files import atomic_open, atomic_path

__all__ = [
    "DicomConversionError",
    "CTSeries",
    "Contour",
    "StructureSet",
    "LPS_TO_RAS",
    "read_ct_series",
    "read_rtstruct",
    "check_references",
    "select_rois",
    "rasterise_roi",
    "label_volume",
    "convert",
    "find_rtstruct",
    "convert_patients",
    "main",
]

#: DICOM patient coordinates are LPS (x to the patient's left, y posterior); NIfTI world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: a contour may lie this fraction of the slice spacing off the nearest slice plane (rounding in the exporter)
PLANE_TOLERANCE = 0.25
#: relative tolerance on equal slice spacing and on slice positions lying on one line along the normal
SPACING_TOLERANCE = 0.01
_EPS_VOXELS = 1e-3  # points this close to the outer voxel edge count as on it (float rounding of ContourData)
_MAX_NAMED = 5


class DicomConversionError(ValueError):
    """The DICOM input cannot be converted as asked (the message names the file, ROI or UID at fault)."""


@dataclass
class CTSeries:
    """One image series, slices sorted along the normal.

    Attributes:
        hu: ``(X, Y, Z)`` = (columns, rows, slices) array in HU (int16 when whole numbers, else float32).
        affine_lps: ``(4, 4)`` voxel index ``(i, j, k, 1)`` -> LPS mm.
        sop_uids, files: per slice ``k``.
    """

    folder: str
    series_uid: str
    frame_of_reference_uid: str | None
    hu: np.ndarray
    affine_lps: np.ndarray
    sop_uids: list[str]
    files: list[str]

    @property
    def affine_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.affine_lps

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine_lps[:3, :3], axis=0))


@dataclass
class Contour:
    """One contour of an ROI: ``points`` ``(N, 3)`` in LPS mm, its ContourGeometricType, the images it references."""

    points: np.ndarray
    geometric_type: str
    image_sop_uids: tuple[str, ...] = ()


@dataclass
class StructureSet:
    """What the conversion needs from an RTSTRUCT file."""

    path: str
    roi_names: dict[int, str]  # ROINumber -> ROIName, file order
    contours: dict[int, list[Contour]]  # ROINumber -> contours
    roi_frames: dict[int, str] = field(default_factory=dict)  # ROINumber -> ReferencedFrameOfReferenceUID
    referenced_series_uids: list[str] = field(default_factory=list)
    frame_of_reference_uids: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# reading


def _pydicom():
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - the message is the point
        raise ImportError("DICOM conversion needs pydicom and scikit-image: pip install -e '.[dicom]'") from err
    return pydicom


def _scan(folder: str) -> tuple[list[tuple[str, object]], list[tuple[str, object]], int]:
    """Every DICOM file under ``folder`` (any depth): (image slices, RTSTRUCTs, number of other files).

    Image slices are files with pixel data, ImagePositionPatient and ImageOrientationPatient; RTDOSE grids and
    multi-frame objects are left out. Pixel data is read lazily (``defer_size``) so scanning reads only headers.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    if not os.path.isdir(folder):
        raise DicomConversionError(f"'{folder}' is not a folder (expected a folder of DICOM files).")
    images, structs, other = [], [], 0
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            try:
                ds = pydicom.dcmread(path, defer_size=1024)
            except (InvalidDicomError, OSError, EOFError):
                other += 1
                continue
            modality = str(ds.get("Modality", ""))
            if modality == "RTSTRUCT":
                structs.append((path, ds))
            elif ("PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
                  and modality != "RTDOSE" and int(ds.get("NumberOfFrames", 1) or 1) == 1):
                images.append((path, ds))
            else:
                other += 1
    return images, structs, other


def _describe(slices) -> str:
    """'CT "Thorax 3mm", 60 slices, e.g. 'a/b.dcm'' for an error message."""
    path, ds = slices[0]
    description = str(ds.get("SeriesDescription", "") or "")
    return (f"{ds.get('Modality', '?')}{f' {description!r}' if description else ''}, {len(slices)} slices, "
            f"e.g. '{path}'")


def read_ct_series(folder: str, series_uid: str | None = None) -> CTSeries:
    """Read the image series in ``folder`` (any depth; RTSTRUCT and other non-image files are skipped).

    Raises:
        DicomConversionError: no image slices, several series and no ``series_uid``, slices of differing size,
            spacing or orientation, unequal slice spacing (a missing slice), slices not stacked along the normal.
    """
    images, _, other = _scan(folder)
    return _series_from(folder, images, other, series_uid)


def _series_from(folder: str, images, other: int, series_uid: str | None) -> CTSeries:
    if not images:
        raise DicomConversionError(
            f"no DICOM image slices in '{folder}' ({other} other file(s) there: none is a DICOM image with pixel data "
            "and ImagePositionPatient). Point --series at the folder of the CT series.")
    by_series: dict[str, list] = {}
    for path, ds in images:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((path, ds))
    if series_uid is None and len(by_series) > 1:
        listing = "; ".join(f"{uid} ({_describe(v)})" for uid, v in by_series.items())
        raise DicomConversionError(
            f"'{folder}' holds {len(by_series)} image series: {listing}. Put one series per folder or pick one with "
            "--series_uid (series_uid=...).")
    if series_uid is not None and series_uid not in by_series:
        raise DicomConversionError(f"series {series_uid} is not in '{folder}'; it holds {sorted(by_series)}.")
    uid = series_uid if series_uid is not None else next(iter(by_series))
    slices = by_series[uid]

    # in-plane geometry must be one and the same for every slice
    first_path, first = slices[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    pixel_spacing = np.array([float(v) for v in first.PixelSpacing]) if "PixelSpacing" in first else None
    if pixel_spacing is None:
        raise DicomConversionError(f"'{first_path}' has no PixelSpacing.")
    size = (int(first.Rows), int(first.Columns))
    for path, ds in slices[1:]:
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DicomConversionError(f"'{path}' is {ds.Rows}x{ds.Columns} pixels but '{first_path}' of the same "
                                       f"series is {size[0]}x{size[1]}.")
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], orientation, atol=1e-4):
            raise DicomConversionError(f"'{path}' has ImageOrientationPatient {list(ds.ImageOrientationPatient)}, "
                                       f"'{first_path}' {orientation.tolist()}: one series must have one orientation.")
        if not np.allclose([float(v) for v in ds.PixelSpacing], pixel_spacing, rtol=1e-4):
            raise DicomConversionError(f"'{path}' has PixelSpacing {list(ds.PixelSpacing)}, '{first_path}' "
                                       f"{pixel_spacing.tolist()}.")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)  # direction of increasing slice index

    # sort along the normal; the positions must lie on one line along it, equally spaced
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices, positions = [slices[i] for i in order], positions[order]
    heights = positions @ normal
    if len(slices) > 1:
        steps = np.diff(heights)
        if np.any(steps <= 1e-6):
            k = int(np.argmin(steps))
            raise DicomConversionError(f"'{slices[k][0]}' and '{slices[k + 1][0]}' lie at the same position "
                                       f"{positions[k].tolist()} along the normal: duplicate slices in one series.")
        step = float(np.median(steps))
        if np.any(np.abs(steps - step) > SPACING_TOLERANCE * step + 1e-3):
            k = int(np.argmax(np.abs(steps - step)))
            raise DicomConversionError(
                f"series {uid} in '{folder}' has unequal slice spacing: {steps[k]:.3f} mm between '{slices[k][0]}' and "
                f"'{slices[k + 1][0]}', {step:.3f} mm elsewhere (a missing slice?).")
        drift = positions - positions[0] - np.outer(heights - heights[0], normal)
        if np.abs(drift).max() > SPACING_TOLERANCE * step + 1e-3:
            k = int(np.argmax(np.abs(drift).max(axis=1)))
            raise DicomConversionError(
                f"'{slices[k][0]}' is {np.abs(drift[k]).max():.3f} mm off the line of slice positions along the normal "
                "(gantry tilt or a sheared series): not supported.")
    else:
        step = float(first.get("SpacingBetweenSlices", 0) or first.get("SliceThickness", 0) or 1.0)

    affine = np.eye(4)
    affine[:3, 0] = row_dir * pixel_spacing[1]  # i = column index: along a row, PixelSpacing[1] apart
    affine[:3, 1] = col_dir * pixel_spacing[0]  # j = row index: down a column, PixelSpacing[0] apart
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[0]

    hu = np.empty((size[1], size[0], len(slices)), dtype=np.float64)
    whole = True
    for k, (path, ds) in enumerate(slices):
        try:
            stored = ds.pixel_array
        except Exception as err:  # pydicom names the missing decoder for compressed transfer syntaxes
            raise DicomConversionError(f"cannot decode the pixel data of '{path}': {err}") from err
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        hu[:, :, k] = (stored.astype(np.float64) * slope + intercept).T  # (rows, cols) -> (i=column, j=row)
        whole = whole and float(slope).is_integer() and float(intercept).is_integer()
    if whole and hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max:
        hu = hu.astype(np.int16)
    else:
        hu = hu.astype(np.float32)
    frame = first.get("FrameOfReferenceUID")
    return CTSeries(folder=folder, series_uid=uid, frame_of_reference_uid=str(frame) if frame else None, hu=hu,
                    affine_lps=affine, sop_uids=[str(ds.SOPInstanceUID) for _, ds in slices],
                    files=[p for p, _ in slices])


def read_rtstruct(path: str) -> StructureSet:
    """ROI names, contours and referenced series of an RTSTRUCT file."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as err:
        raise DicomConversionError(f"cannot read RTSTRUCT '{path}': {err}") from err
    return _structure_set_from(path, ds)


def _structure_set_from(path: str, ds) -> StructureSet:
    if str(ds.get("Modality", "")) != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise DicomConversionError(f"'{path}' is not an RTSTRUCT (Modality {ds.get('Modality')!r}, expected "
                                   "'RTSTRUCT' with a StructureSetROISequence).")
    names, frames = {}, {}
    for roi in ds.StructureSetROISequence:
        names[int(roi.ROINumber)] = str(roi.get("ROIName", f"ROI {roi.ROINumber}"))
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames[int(roi.ROINumber)] = str(roi.ReferencedFrameOfReferenceUID)
    contours: dict[int, list[Contour]] = {number: [] for number in names}
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        for item in roi_contour.get("ContourSequence", []):
            data = np.array([float(v) for v in item.get("ContourData", [])])
            if data.size % 3:
                raise DicomConversionError(f"'{path}', ROI '{names.get(number, number)}': ContourData has "
                                           f"{data.size} values, not a multiple of 3.")
            refs = tuple(str(ref.ReferencedSOPInstanceUID) for ref in item.get("ContourImageSequence", [])
                         if "ReferencedSOPInstanceUID" in ref)
            contours.setdefault(number, []).append(
                Contour(data.reshape(-1, 3), str(item.get("ContourGeometricType", "CLOSED_PLANAR")), refs))
    series_uids, frame_uids = [], []
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        if frame.get("FrameOfReferenceUID"):
            frame_uids.append(str(frame.FrameOfReferenceUID))
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                if series.get("SeriesInstanceUID"):
                    series_uids.append(str(series.SeriesInstanceUID))
    return StructureSet(path=path, roi_names=names, contours=contours, roi_frames=frames,
                        referenced_series_uids=series_uids, frame_of_reference_uids=frame_uids)


# ----------------------------------------------------------------------------------------------------------------
# checks and rasterisation


def select_rois(structure: StructureSet, rois: Sequence[str]) -> list[tuple[int, str]]:
    """``[(ROINumber, ROIName)]`` for ``rois`` in the order given; ``"A|B"`` takes the first of A, B the file has."""
    if isinstance(rois, str) or not rois:
        raise DicomConversionError(f"rois must be a non-empty list of ROI names, got {rois!r}.")
    by_name = {}
    for number, name in structure.roi_names.items():
        by_name.setdefault(name, number)
    chosen = []
    for wanted in rois:
        alternatives = [a.strip() for a in str(wanted).split("|") if a.strip()]
        found = next((a for a in alternatives if a in by_name), None)
        if found is None:
            present = ", ".join(repr(n) for n in structure.roi_names.values()) or "none"
            raise DicomConversionError(f"ROI {wanted!r} not found in RTSTRUCT '{structure.path}'; the ROIs there "
                                       f"are: {present}.")
        if any(number == by_name[found] for number, _ in chosen):
            raise DicomConversionError(f"ROI {found!r} is asked for twice ({list(rois)}).")
        chosen.append((by_name[found], found))
    return chosen


def check_references(structure: StructureSet, series: CTSeries, roi_numbers: Sequence[int]) -> None:
    """Refuse an RTSTRUCT drawn on another series: referenced series UID, contour image UIDs, frame of reference."""
    refs = list(dict.fromkeys(structure.referenced_series_uids))
    if refs and series.series_uid not in refs:
        raise DicomConversionError(
            f"RTSTRUCT '{structure.path}' references series {', '.join(refs)} (ReferencedSeriesInstanceUID), but the "
            f"series in '{series.folder}' is {series.series_uid}: the structures were drawn on another series.")
    known = set(series.sop_uids)
    for number in roi_numbers:
        missing = list(dict.fromkeys(uid for c in structure.contours.get(number, []) for uid in c.image_sop_uids
                                     if uid not in known))
        if missing:
            raise DicomConversionError(
                f"RTSTRUCT '{structure.path}', ROI '{structure.roi_names[number]}': its contours reference "
                f"{len(missing)} image(s) not in series {series.series_uid} ('{series.folder}'), e.g. "
                f"ReferencedSOPInstanceUID {', '.join(missing[:3])}: the structures were drawn on other images (or "
                "slices are missing).")
        frame = structure.roi_frames.get(number)
        if frame and series.frame_of_reference_uid and frame != series.frame_of_reference_uid:
            raise DicomConversionError(
                f"RTSTRUCT '{structure.path}', ROI '{structure.roi_names[number]}' is in frame of reference {frame}, "
                f"the series in '{series.folder}' in {series.frame_of_reference_uid}.")


def rasterise_roi(contours: Sequence[Contour], series: CTSeries, roi_name: str = "?", clip: bool = False,
                  source: str = "") -> np.ndarray:
    """Boolean ``(X, Y, Z)`` mask of an ROI's closed planar contours in ``series``' voxel grid.

    Points go to continuous voxel coordinates through ``inverse(affine_lps)`` (any orientation, oblique included);
    each slice's contours are combined by :func:`_fill_slice` (union, holes by containment).

    Raises:
        DicomConversionError: a contour off the slice planes, not planar, open, or (unless ``clip``) with points
            beyond the outer voxel edges of the image (how far, in mm, is said).
    """
    shape = series.shape
    mask = np.zeros(shape, dtype=bool)
    to_voxel = np.linalg.inv(series.affine_lps)
    spacing = np.array(series.spacing)
    where = f"RTSTRUCT '{source}', " if source else ""
    by_slice: dict[int, list[np.ndarray]] = {}
    for contour in contours:
        kind = contour.geometric_type.upper()
        if kind == "POINT" or len(contour.points) == 0:
            continue  # a marker, no area
        if kind != "CLOSED_PLANAR" or len(contour.points) < 3:
            raise DicomConversionError(f"{where}ROI '{roi_name}' has a {kind} contour of {len(contour.points)} "
                                       "point(s); only CLOSED_PLANAR contours enclose an area.")
        ijk = (np.c_[contour.points, np.ones(len(contour.points))] @ to_voxel.T)[:, :3]
        k = float(np.round(ijk[:, 2].mean()))
        off = np.abs(ijk[:, 2] - k).max()
        if off > PLANE_TOLERANCE:
            centre = contour.points.mean(axis=0)
            raise DicomConversionError(
                f"{where}ROI '{roi_name}': a contour (centre {np.round(centre, 2).tolist()} mm LPS) lies "
                f"{off * spacing[2]:.1f} mm from the nearest slice plane (slices {spacing[2]:.2f} mm apart): it is "
                "not on this series' slice planes (contours drawn on another series, or not planar).")
        # how far beyond the image (outer voxel edges at -0.5 and n - 0.5), in mm
        low, high = -0.5 - ijk, ijk - (np.array(shape) - 0.5)
        beyond = np.maximum(np.maximum(low, high), 0.0)
        beyond[beyond < _EPS_VOXELS] = 0.0
        if np.any(beyond > 0):
            if not clip:
                distance = float(np.sqrt(((beyond * spacing) ** 2).sum(axis=1)).max())
                raise DicomConversionError(
                    f"{where}ROI '{roi_name}': a contour on slice {int(k)} reaches {distance:.1f} mm beyond the edge "
                    f"of the image (series {series.series_uid}, {shape[0]}x{shape[1]}x{shape[2]} voxels of "
                    f"{spacing[0]:.3g}x{spacing[1]:.3g}x{spacing[2]:.3g} mm). Use --clip (clip=True) to keep the part "
                    "inside the image.")
            if not 0 <= k < shape[2]:
                warnings.warn(f"ROI '{roi_name}': a contour off the image (slice {int(k)}) was left out (clip).")
                continue
        by_slice.setdefault(int(k), []).append(ijk[:, :2])
    for k, polygons in by_slice.items():
        mask[:, :, k] = _fill_slice(polygons, shape[:2])
    return mask


def _fill_slice(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """One slice of an ROI from its contours ``(N, 2)`` in (column, row) voxel coordinates.

    Rule: a contour whose every point lies strictly inside another contour (not on it) is nested in it; its depth is
    how many contours it is nested in. Even depth fills the pixels whose centre is inside or on it (union, so abutting
    or duplicated contours add up); odd depth is a hole and clears the pixels strictly inside it (pixels on a hole's
    contour are on the structure's inner boundary and stay in). Shallower contours first, so an island in a hole is
    filled again.
    """
    depth = [sum(_strictly_inside(a, b) for j, b in enumerate(polygons) if j != i) for i, a in enumerate(polygons)]
    out = np.zeros(shape, dtype=bool)
    for d, poly in sorted(zip(depth, polygons), key=lambda t: t[0]):
        closed, strict = _pixels_of(poly, shape)
        if d % 2 == 0:
            out |= closed
        else:
            out &= ~strict
    return out


def _inside(poly: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Even-odd test of ``points`` ``(M, 2)`` against the closed polygon ``poly`` ``(N, 2)`` (edges undecided)."""
    a, b = poly, np.roll(poly, -1, axis=0)
    x, y = points[:, :1], points[:, 1:]
    crosses = (a[:, 1] > y) != (b[:, 1] > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
    return (np.count_nonzero(crosses & (x < at), axis=1) % 2) == 1


def _on_edges(poly: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Whether each point ``(M, 2)`` lies within ``_EPS_VOXELS`` of an edge of the closed polygon ``poly``."""
    on = np.zeros(len(points), dtype=bool)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):
        ab = b - a
        t = np.clip((points - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0)
        on |= np.linalg.norm(points - (a + t[:, None] * ab), axis=1) <= _EPS_VOXELS
    return on


def _strictly_inside(inner: np.ndarray, outer: np.ndarray) -> bool:
    if np.any(inner.min(axis=0) < outer.min(axis=0)) or np.any(inner.max(axis=0) > outer.max(axis=0)):
        return False  # not even inside its bounding box
    return bool(np.all(_inside(outer, inner) & ~_on_edges(outer, inner)))


def _pixels_of(poly: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(inside or on, strictly inside)`` pixel masks of one polygon (pixel centres at integer coordinates)."""
    from skimage.draw import polygon

    inside = np.zeros(shape, dtype=bool)
    inside[polygon(poly[:, 0], poly[:, 1], shape=shape)] = True
    on = np.zeros(shape, dtype=bool)
    for a, b in zip(poly, np.roll(poly, -1, axis=0)):  # centres on an edge: only each edge's bounding box is tested
        lo = np.maximum(np.ceil(np.minimum(a, b) - _EPS_VOXELS), 0).astype(int)
        hi = np.minimum(np.floor(np.maximum(a, b) + _EPS_VOXELS), np.array(shape) - 1).astype(int)
        if np.any(hi < lo):
            continue
        i, j = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        centres = np.c_[i.ravel(), j.ravel()].astype(float)
        hit = _on_edges(np.array([a, b]), centres)
        on[i.ravel()[hit], j.ravel()[hit]] = True
    return inside | on, inside & ~on


def label_volume(structure: StructureSet, series: CTSeries, rois: Sequence[str], merge: bool = False,
                 clip: bool = False) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """``(uint8 (X, Y, Z) label, {ROI name: label value}, {ROI name: voxels inside it})``.

    Values 1..K in the order of ``rois`` (later ROIs overwrite earlier ones where they overlap), or 1 for all
    with ``merge``. An ROI with no voxel is an error (a silent empty label would train on nothing).
    """
    chosen = select_rois(structure, rois)
    check_references(structure, series, [number for number, _ in chosen])
    if len(chosen) > 255:
        raise DicomConversionError(f"{len(chosen)} ROIs do not fit a uint8 label.")
    label = np.zeros(series.shape, dtype=np.uint8)
    values, counts = {}, {}
    for value, (number, name) in enumerate(chosen, start=1):
        mask = rasterise_roi(structure.contours.get(number, []), series, name, clip=clip, source=structure.path)
        counts[name] = int(mask.sum())
        if counts[name] == 0:
            raise DicomConversionError(f"RTSTRUCT '{structure.path}', ROI '{name}' has no voxel in the series of "
                                       f"'{series.folder}' ({len(structure.contours.get(number, []))} contours).")
        values[name] = 1 if merge else value
        label[mask] = values[name]
    return label, values, counts


# ----------------------------------------------------------------------------------------------------------------
# writing


def _save(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    import nibabel as nib

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:  # keeps the extensions: nibabel picks the format by them
        nib.save(image, tmp)


def _convert_loaded(series: CTSeries, structure: StructureSet, rois, image_path, label_path, merge, clip) -> dict:
    label, values, counts = label_volume(structure, series, rois, merge=merge, clip=clip)
    _save(series.hu, series.affine_ras, image_path)
    _save(label, series.affine_ras, label_path)
    return {"image": image_path, "label": label_path, "shape": series.shape,
            "spacing": tuple(round(s, 6) for s in series.spacing), "series_uid": series.series_uid,
            "labels": values, "voxels": counts, "roi_names": list(structure.roi_names.values())}


def convert(series_dir: str, rtstruct: str, rois: Sequence[str], image_path: str, label_path: str,
            merge: bool = False, series_uid: str | None = None, clip: bool = False) -> dict:
    """Write the image and label NIfTI files of one CT series + RTSTRUCT; nothing is written when a check fails.

    Returns:
        ``{"image", "label", "shape", "spacing", "series_uid", "labels": {ROI: value}, "voxels": {ROI: count},
        "roi_names": all ROI names in the file}``.
    """
    structure = read_rtstruct(rtstruct)
    select_rois(structure, rois)  # a wrong name fails before the series is read
    series = read_ct_series(series_dir, series_uid)
    return _convert_loaded(series, structure, rois, image_path, label_path, merge, clip)


def find_rtstruct(folder: str) -> str:
    """The one RTSTRUCT file under ``folder`` (any depth)."""
    _, structs, _ = _scan(folder)
    return _one_rtstruct(folder, structs)


def _one_rtstruct(folder: str, structs) -> str:
    if not structs:
        raise DicomConversionError(f"'{folder}': no RTSTRUCT file found (no DICOM file with Modality RTSTRUCT).")
    if len(structs) > 1:
        raise DicomConversionError(f"'{folder}' holds {len(structs)} RTSTRUCT files "
                                   f"({', '.join(p for p, _ in structs[:_MAX_NAMED])}); keep one per patient.")
    return structs[0][0]


def convert_patients(patient_dirs: Sequence[str], out_dir: str, rois: Sequence[str], merge: bool = False,
                     val_fraction: float = 0.25, seed: int = 0, output: str = "datalist.json",
                     clip: bool = False) -> str:
    """Convert every patient folder (one CT series + one RTSTRUCT each) and write an MSD-form datalist.

    Writes ``out_dir/images/<folder name>.nii.gz`` and ``out_dir/labels/<folder name>.nii.gz``; the datalist
    ``out_dir/<output>`` has paths relative to ``out_dir``: a seeded split (``tools/data/prepare_datalist.split_indices``)
    into ``training`` and ``validation``, and ``testing`` = the validation images. Returns the datalist's path.
    """
    from tools.data.prepare_datalist import split_indices

    if not patient_dirs:
        raise DicomConversionError("no patient folders given.")
    names = [os.path.basename(os.path.normpath(p)) for p in patient_dirs]
    if len(set(names)) != len(names):
        raise DicomConversionError(f"patient folder names must differ (they name the output files): {names}.")
    train_idx, val_idx = split_indices(len(patient_dirs), val_fraction, seed)  # fails early for < 2 patients
    out_dir = os.path.abspath(out_dir)
    entries = []
    for folder, name in zip(patient_dirs, names):
        images, structs, other = _scan(folder)
        try:
            rs_path = _one_rtstruct(folder, structs)
            structure = _structure_set_from(rs_path, structs[0][1])
            select_rois(structure, rois)
            series = _series_from(folder, images, other, None)
            entry = {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz"}
            summary = _convert_loaded(series, structure, rois, os.path.join(out_dir, entry["image"]),
                                      os.path.join(out_dir, entry["label"]), merge, clip)
        except DicomConversionError as err:
            raise DicomConversionError(f"patient '{name}': {err}") from err
        print(f"{name}: {summary['shape']} voxels of {summary['spacing']} mm, "
              + ", ".join(f"{roi} (label {summary['labels'][roi]}) {n} voxels" for roi, n in summary["voxels"].items()))
        entries.append(entry)
    datalist = {"training": [entries[i] for i in train_idx], "validation": [entries[i] for i in val_idx],
                "testing": [{"image": entries[i]["image"]} for i in val_idx]}
    path = output if os.path.isabs(output) else os.path.join(out_dir, output)
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(datalist, f, indent=2)
    print(f"wrote {path} (training {len(train_idx)}, validation {len(val_idx)}, testing = the validation images); "
          f"paths relative to {out_dir}")
    return path


def patient_folders(root: str) -> list[str]:
    """The immediate subfolders of ``root``, sorted (one per patient)."""
    if not os.path.isdir(root):
        raise DicomConversionError(f"--datalist '{root}' is not a folder (expected one subfolder per patient).")
    found = [os.path.join(root, n) for n in sorted(os.listdir(root))
             if os.path.isdir(os.path.join(root, n)) and not n.startswith(".")]
    if not found:
        raise DicomConversionError(f"--datalist '{root}' has no subfolders (expected one per patient).")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roi", action="append", required=True,
                        help="ROI name (repeat for labels 1..K in this order; 'A|B' = whichever the file has)")
    parser.add_argument("--merge", action="store_true", help="one binary label: the union of the ROIs")
    parser.add_argument("--clip", action="store_true", help="keep the part of a contour inside the image "
                        "instead of refusing contours that reach outside it")
    single = parser.add_argument_group("one patient")
    single.add_argument("--series", help="folder of the CT series")
    single.add_argument("--rtstruct", help="RTSTRUCT file")
    single.add_argument("--image", help="output image NIfTI (.nii.gz)")
    single.add_argument("--label", help="output label NIfTI (.nii.gz)")
    single.add_argument("--series_uid", default=None, help="the series to take when the folder holds several")
    many = parser.add_argument_group("many patients")
    many.add_argument("--datalist", metavar="PATIENTS", help="folder with one subfolder per patient (CT + RTSTRUCT)")
    many.add_argument("--out_dir", help="where images/, labels/ and the datalist go")
    many.add_argument("--val_fraction", type=float, default=0.25)
    many.add_argument("--seed", type=int, default=0)
    many.add_argument("--output", default="datalist.json", help="datalist file name (relative to --out_dir)")
    args = parser.parse_args(argv)
    try:
        if args.datalist:
            if not args.out_dir:
                parser.error("--datalist needs --out_dir")
            convert_patients(patient_folders(args.datalist), args.out_dir, args.roi, merge=args.merge,
                             val_fraction=args.val_fraction, seed=args.seed, output=args.output, clip=args.clip)
        else:
            missing = [f"--{k}" for k in ("series", "rtstruct", "image", "label") if not getattr(args, k)]
            if missing:
                parser.error(f"one patient needs {', '.join(missing)} (or use --datalist PATIENTS --out_dir OUT)")
            summary = convert(args.series, args.rtstruct, args.roi, args.image, args.label, merge=args.merge,
                              series_uid=args.series_uid, clip=args.clip)
            print(f"{summary['image']}: {summary['shape']} voxels of {summary['spacing']} mm")
            print(f"{summary['label']}: " + ", ".join(f"{roi} = {summary['labels'][roi]} ({n} voxels)"
                                                      for roi, n in summary["voxels"].items()))
    except (DicomConversionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make `tools` importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
