"""What each label value of a finetuning bundle is, in the terms of a DICOM Segmentation (SEG) object.

A SEG names each segment with a label and two coded concepts (DICOM PS3.3 C.8.20.2, codes from SNOMED CT, scheme
``SCT``): a category (what kind of thing) and a type (which thing), optionally with a modifier (left/right). Written
into every finetuning bundle's ``metadata.json`` as ``dicom_segments`` (keyed by the label value of the post-processed
label map, the values of its ``channel_def``), so that a label map saved back to a PACS as DICOM SEG carries the
bundle's own segment names and the right codes (``tools/monailabel/dicom_seg.py`` turns them into MONAI Label's
``label_info``; ``docs/pacs.md``).

The codes are those of DICOM's anatomic and segmentation context groups (CID 7150 categories, CID 7166/4031 anatomic
structures, CID 244 laterality modifiers). A structure without a single SNOMED concept ("portal and splenic veins")
takes the concept of its main part and says so in its description.
"""
from __future__ import annotations

__all__ = ["DICOM_SEGMENTS", "dicom_segments"]

ANATOMY = ("123037004", "SCT", "Anatomical Structure")
ALTERED = ("49755003", "SCT", "Morphologically Altered Structure")
RIGHT = ("24028007", "SCT", "Right")
LEFT = ("7771000", "SCT", "Left")

#: label name -> (category, type, modifier or None, display colour RGB, description or None)
_SEGMENTS = {
    "spleen": (ANATOMY, ("78961009", "SCT", "Spleen"), None, (157, 108, 162), None),
    "right kidney": (ANATOMY, ("64033007", "SCT", "Kidney"), RIGHT, (185, 102, 83), None),
    "left kidney": (ANATOMY, ("64033007", "SCT", "Kidney"), LEFT, (185, 102, 83), None),
    "gallbladder": (ANATOMY, ("28231008", "SCT", "Gallbladder"), None, (139, 150, 98), None),
    "esophagus": (ANATOMY, ("32849002", "SCT", "Esophagus"), None, (211, 171, 143), None),
    "liver": (ANATOMY, ("10200004", "SCT", "Liver"), None, (221, 130, 101), None),
    "stomach": (ANATOMY, ("69695003", "SCT", "Stomach"), None, (216, 132, 105), None),
    "aorta": (ANATOMY, ("15825003", "SCT", "Aorta"), None, (224, 97, 76), None),
    "inferior vena cava": (ANATOMY, ("64131007", "SCT", "Inferior vena cava"), None, (0, 151, 206), None),
    "portal and splenic veins": (ANATOMY, ("32764006", "SCT", "Portal vein"), None, (0, 122, 171),
                                 "portal vein and splenic vein (one label in BTCV; coded as the portal vein)"),
    "pancreas": (ANATOMY, ("15776009", "SCT", "Pancreas"), None, (249, 180, 111), None),
    "right adrenal gland": (ANATOMY, ("23451007", "SCT", "Adrenal gland"), RIGHT, (244, 217, 154), None),
    "left adrenal gland": (ANATOMY, ("23451007", "SCT", "Adrenal gland"), LEFT, (244, 217, 154), None),
    "tumour": (ALTERED, ("108369006", "SCT", "Neoplasm"), None, (255, 0, 0), "liver tumour"),
    "necrotic and non-enhancing tumour core": (ALTERED, ("108369006", "SCT", "Neoplasm"), None, (255, 0, 0),
                                               "BraTS label 1: necrotic and non-enhancing tumour core"),
    "peritumoral oedema": (ALTERED, ("79654002", "SCT", "Edema"), None, (0, 255, 0), "BraTS label 2"),
    "enhancing tumour": (ALTERED, ("108369006", "SCT", "Neoplasm"), None, (255, 255, 0),
                         "BraTS label 4: enhancing tumour"),
}
DICOM_SEGMENTS = _SEGMENTS


def _code(code: tuple) -> dict:
    value, scheme, meaning = code
    return {"CodeValue": value, "CodingSchemeDesignator": scheme, "CodeMeaning": meaning}


def dicom_segments(channel_def: dict) -> dict:
    """``{"1": {"label", "description", "category", "type", ["modifier"], "color"}}`` for every non-background value of
    a post-processed ``channel_def`` (``{"0": "background", "1": "spleen"}``); a name without codes is an error."""
    out = {}
    for value, name in channel_def.items():
        if name == "background":
            continue
        if name not in _SEGMENTS:
            raise KeyError(f"no DICOM segment codes for label {value} {name!r}: add it to {__name__}._SEGMENTS")
        category, kind, modifier, colour, description = _SEGMENTS[name]
        seg = {"label": name, "description": description or name, "category": _code(category), "type": _code(kind)}
        if modifier:
            seg["modifier"] = _code(modifier)
        seg["color"] = list(colour)
        out[value] = seg
    return out
