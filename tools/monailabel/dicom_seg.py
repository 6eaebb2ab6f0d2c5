"""Save a label map to a PACS through MONAI Label as a DICOM SEG whose segments carry the bundle's names and codes.

MONAI Label's ``PUT /datastore/label`` (tag ``final``) with a DICOMweb datastore converts the label map into a DICOM
SEG with dcmqi and stores it in the PACS (STOW-RS). The segments of that SEG come from the request's ``label_info``,
paired by position with the label values present in the map, in ascending order: the i-th entry describes the i-th
smallest non-zero value; an entry without ``segmentAttribute`` gets the label name, a generic category and the type
code of the spleen (SNOMED CT 78961009) whatever the organ. So a client must send one entry per value present, in that
order, with the codes: :func:`label_info` builds it from a bundle's ``metadata.json`` (``dicom_segments``, written by
the bundle generator), and :func:`save_label` sends it.

Command line (e.g. after ``POST /infer``, for a label map reviewed or corrected by hand)::

    python tools/monailabel/dicom_seg.py --server http://127.0.0.1:8000 --bundle apps/monaibundle/model/<bundle> \\
        --image <SeriesInstanceUID> --label label.nii.gz
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterable

__all__ = ["label_info", "label_values", "save_label"]


def _segments(metadata: dict, where: str) -> dict:
    segments = metadata.get("dicom_segments")
    if not isinstance(segments, dict) or not segments:
        raise KeyError(f"{where} has no 'dicom_segments' (the segment names and codes of each label value); bundles "
                       f"of hybridmim-components >= 0.2.0 carry it")
    return segments


def label_info(metadata: dict, values: Iterable[int], model_name: str, where: str = "metadata.json") -> list[dict]:
    """MONAI Label's ``label_info`` for a label map holding ``values``: one entry per non-zero value, ascending (the
    order MONAI Label pairs entries with values), each with dcmqi's ``segmentAttribute`` (``labelID`` = the value,
    label, description, SNOMED CT category/type/modifier, colour). A value the bundle does not define is an error."""
    segments = _segments(metadata, where)
    out = []
    for value in sorted({int(v) for v in values} - {0}):
        seg = segments.get(str(value))
        if seg is None:
            known = ", ".join(f"{k} {s['label']}" for k, s in segments.items())
            raise ValueError(f"label value {value} is not one of the bundle's segments ({where}: {known})")
        attribute = {
            "labelID": value,
            "SegmentLabel": seg["label"],
            "SegmentDescription": seg["description"],
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": model_name,
            "SegmentedPropertyCategoryCodeSequence": seg["category"],
            "SegmentedPropertyTypeCodeSequence": seg["type"],
            "recommendedDisplayRGBValue": seg["color"],
        }
        if "modifier" in seg:
            attribute["SegmentedPropertyTypeModifierCodeSequence"] = seg["modifier"]
        out.append({"name": seg["label"], "idx": value, "color": seg["color"], "model_name": model_name,
                    "segmentAttribute": attribute})
    return out


def label_values(label_path: str) -> list[int]:
    """The distinct values of a label map file (NIfTI, NRRD...), as ints."""
    import nibabel as nib
    import numpy as np

    values = np.unique(np.asarray(nib.load(label_path).dataobj))
    if not np.all(values == np.round(values)):
        raise ValueError(f"{label_path} holds non-integer values: {values[:10]}")
    return [int(v) for v in values]


def _multipart(fields: dict[str, str], file_field: str, file_path: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    with open(file_path, "rb") as f:
        data = f.read()
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; '
                 f'filename="{os.path.basename(file_path)}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                 + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def save_label(server: str, image_id: str, label_path: str, bundle_root: str, timeout: float = 300) -> dict:
    """``PUT /datastore/label?image=<image_id>&tag=final`` with the label map and the ``label_info`` of the bundle in
    ``bundle_root`` (its ``configs/metadata.json``); returns MONAI Label's answer. With a DICOMweb datastore, MONAI
    Label stores the label in the PACS as a DICOM SEG referencing the series ``image_id``."""
    meta_path = os.path.join(bundle_root, "configs", "metadata.json")
    with open(meta_path) as f:
        metadata = json.load(f)
    info = label_info(metadata, label_values(label_path), os.path.basename(os.path.normpath(bundle_root)), meta_path)
    if not info:
        raise ValueError(f"{label_path} holds no label (only 0): MONAI Label would store no DICOM SEG")
    body, content_type = _multipart({"params": json.dumps({"label_info": info})}, "label", label_path)
    query = urllib.parse.urlencode({"image": image_id, "tag": "final"})
    request = urllib.request.Request(f"{server}/datastore/label?{query}", data=body, method="PUT",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"MONAI Label refused the label of {image_id}: HTTP {e.code} {e.read()[:2000]!r}") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", required=True, help="MONAI Label's URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--bundle", required=True, help="the bundle folder whose configs/metadata.json names the labels")
    parser.add_argument("--image", required=True, help="the image id: the SeriesInstanceUID of the source series")
    parser.add_argument("--label", required=True, help="the label map (NIfTI) on the series' grid")
    args = parser.parse_args(argv)
    print(json.dumps(save_label(args.server, args.image, args.label, args.bundle), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
