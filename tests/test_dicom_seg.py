"""The pieces of the PACS path that need no server: segment names and codes from the bundles' metadata, MONAI Label's
``label_info`` built from them, the request that saves a label, the check of a DICOM series before it is served, and
the dcmqi look-up of the MONAI Label wrapper. The PACS itself (Orthanc + MONAI Label) is tested in
``tests/test_monailabel_server.py`` (marker ``pacs``)."""
from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import os
import stat
import threading
import urllib.parse

import numpy as np
import pytest

from tools.bundles.bundlegen.finetune import TASKS, bundle_name
from tools.monailabel.dicom_seg import label_info, save_label
from tools.monailabel.orthanc import series_problems

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metadata(backbone: str, task: str) -> dict:
    with open(os.path.join(REPO_ROOT, "bundles", bundle_name(backbone, task), "configs", "metadata.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("backbone", ["swin", "unet"])
def test_every_label_value_of_a_bundle_has_its_segment(backbone, task):
    meta = _metadata(backbone, task)
    channel_def = meta["network_data_format"]["post_processed_outputs"]["pred"]["channel_def"]
    segments = meta["dicom_segments"]
    assert set(segments) == {k for k, name in channel_def.items() if name != "background"}
    for value, seg in segments.items():
        assert seg["label"] == channel_def[value]
        for key in ("category", "type"):
            assert seg[key]["CodingSchemeDesignator"] == "SCT" and seg[key]["CodeValue"].isdigit(), (value, seg)
        assert len(seg["color"]) == 3 and all(0 <= c <= 255 for c in seg["color"])


def test_label_info_has_one_entry_per_value_present_in_ascending_order():
    meta = _metadata("unet", "btcv")
    info = label_info(meta, [0, 5, 2, 2, 0], "hybridmim_unet_btcv")
    # MONAI Label pairs the i-th entry with the i-th smallest non-zero value: 2 (right kidney) then 5 (esophagus)
    assert [e["idx"] for e in info] == [2, 5]
    assert [e["name"] for e in info] == ["right kidney", "esophagus"]
    kidney = info[0]["segmentAttribute"]
    assert kidney["labelID"] == 2 and kidney["SegmentLabel"] == "right kidney"
    assert kidney["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == "64033007"  # kidney
    assert kidney["SegmentedPropertyTypeModifierCodeSequence"]["CodeMeaning"] == "Right"
    assert kidney["SegmentAlgorithmName"] == "hybridmim_unet_btcv" and info[0]["model_name"] == "hybridmim_unet_btcv"
    assert "SegmentedPropertyTypeModifierCodeSequence" not in info[1]["segmentAttribute"]
    # BraTS label values are 1, 2, 4: the label of 4 is the enhancing tumour, not the third entry of a list
    brats = label_info(_metadata("swin", "brats"), [4, 1], "b")
    assert [(e["idx"], e["name"]) for e in brats] == [(1, "necrotic and non-enhancing tumour core"),
                                                      (4, "enhancing tumour")]


def test_label_info_refuses_a_value_the_bundle_does_not_define():
    with pytest.raises(ValueError, match=r"label value 3 is not one of the bundle's segments.*1 spleen"):
        label_info(_metadata("unet", "msd_spleen"), [0, 1, 3], "m")
    with pytest.raises(KeyError, match="old.json has no 'dicom_segments'"):
        label_info({"version": "0.1.0"}, [1], "m", where="old.json")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_PUT(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Recorder.seen.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"image": "x", "label": "x"}).encode())

    def log_message(self, *args):
        pass


def test_save_label_sends_the_label_and_the_bundles_label_info(tmp_path):
    import nibabel as nib

    bundle = tmp_path / "hybridmim_unet_btcv"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(_metadata("unet", "btcv")))
    label = np.zeros((4, 5, 6), dtype=np.uint8)
    label[1, 1, 1], label[2, 2, 2] = 6, 1
    path = str(tmp_path / "label.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)

    server = http.server.HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _Recorder.seen.clear()
        answer = save_label(f"http://127.0.0.1:{server.server_port}", "1.2.3.4", path, str(bundle))
    finally:
        server.shutdown()
    assert answer == {"image": "x", "label": "x"}
    (url, content_type, body), = _Recorder.seen
    parsed = urllib.parse.urlparse(url)
    assert parsed.path == "/datastore/label"
    assert urllib.parse.parse_qs(parsed.query) == {"image": ["1.2.3.4"], "tag": ["final"]}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    params = json.loads(parts["params"].get_content())
    assert [(e["idx"], e["name"]) for e in params["label_info"]] == [(1, "spleen"), (6, "liver")]
    with open(path, "rb") as f:
        assert parts["label"].get_content() == f.read()
    assert parts["label"].get_filename() == "label.nii.gz"


def _slice(path, z: float, **changes):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.SOPClassUID, ds.SOPInstanceUID = "CT", meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = "1.2.3", "1.2.3.4", "1.2.3.5"
    ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing = [0, 0, z], [1, 0, 0, 0, 1, 0], [1, 1]
    for key, value in changes.items():
        setattr(ds, key, value)
    if pydicom.__version__.startswith("2."):
        ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.save_as(str(path))
    return str(path)


def test_series_problems_names_the_file_and_attribute(tmp_path):
    good = [_slice(tmp_path / f"s{i}.dcm", float(i)) for i in range(2)]
    assert series_problems(good) == []
    bad = _slice(tmp_path / "bad.dcm", 2.0, FrameOfReferenceUID="")
    assert series_problems(good + [bad]) == ["bad.dcm: FrameOfReferenceUID is missing or empty"]
    other = _slice(tmp_path / "other.dcm", 3.0, SeriesInstanceUID="1.2.3.9")
    assert any("2 series in one folder" in p for p in series_problems(good + [other]))
    tilted = _slice(tmp_path / "tilted.dcm", 4.0, ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.1])
    assert any("2 different orientations" in p for p in series_problems(good + [tilted]))


def test_the_monailabel_wrapper_requires_dcmqi_for_a_dicomweb_server(tmp_path, monkeypatch):
    import importlib.util

    from tools.monailabel import start_server

    monkeypatch.setattr(start_server.sysconfig, "get_path", lambda name: str(tmp_path / "no_scripts"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(start_server.importlib.util, "find_spec",
                        lambda name: None if name == "dcmqi" else real_find_spec(name))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert start_server.dcmqi_on_path(["start_server", "--studies", "/data/images"]) is None
    with pytest.raises(SystemExit, match=r"pip install dcmqi==1\.5\.7"):
        start_server.dcmqi_on_path(["start_server", "--studies", "http://127.0.0.1:8042/dicom-web"])
    # pip's scripts folder of the environment is searched, as in an environment that is not activated
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    tool = scripts / "itkimage2segimage"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(start_server.sysconfig, "get_path", lambda name: str(scripts))
    assert start_server.dcmqi_on_path(["start_server", "--studies", "http://h/dicom-web"]) == str(tool)


def test_the_check_command_names_what_a_series_lacks(tmp_path):
    import subprocess
    import sys

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir(), bad.mkdir()
    for i in range(2):
        _slice(good / f"s{i}.dcm", float(i))
        _slice(bad / f"s{i}.dcm", float(i), FrameOfReferenceUID="" if i else "1.2.3.5")
    script = os.path.join(REPO_ROOT, "tools", "monailabel", "orthanc.py")
    ok = subprocess.run([sys.executable, script, "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip().endswith(": ready"), ok.stdout + ok.stderr
    failed = subprocess.run([sys.executable, script, "check", str(bad)], capture_output=True, text=True)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "s1.dcm: FrameOfReferenceUID is missing or empty" in failed.stdout
