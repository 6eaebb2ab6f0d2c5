"""The finetune bundles served by a real MONAI Label server (its own ``monaibundle`` sample app), over HTTP, as a
recipient serves a shared bundle: packed, downloaded, and run by a Python whose only install of this project is the
released wheel.

Needs MONAI Label 0.8.5 (``tools/monailabel/requirements.txt``; CI installs it in a side environment, once with MONAI
1.5.1 and once with 1.6.1); skipped where ``monailabel`` is not importable. Three bundles are trained tiny for one epoch
through their own ``train.json`` (MONAI CLI, in the checkout): a UNet (MSD spleen, 2 classes), a SwinUNETR (BTCV, 14
classes, ``downsample merging_legacy``: the packed configs must carry it) and a UNet BraTS bundle (4 MRI channels given
as one 4-channel NIfTI, as the bundle README says). Each is packed (``tools/bundles/pack_bundle.py``: the trained
settings go into its configs) and downloaded into the app's model folder with ``python -m monai.bundle download --url
file://...`` by the wheel's Python (``tests/wheel_env.py``), which then starts the server (``--conf zoo_source local``,
127.0.0.1, a free port, outside the checkout). ``POST /infer/<bundle>`` returns a label map that must have the input's
shape and affine, only the bundle's label values, and equal the label map the downloaded bundle's own
``inference.json`` writes for the same image through the MONAI CLI.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="MONAI Label is not installed (tools/monailabel/requirements.txt)")

from tools.bundles.bundlegen.finetune import TASKS, bundle_name  # noqa: E402
from tools.data.make_demo_data import make_brats_dataset, make_ct_dataset  # noqa: E402
from tools.monailabel.server import START_SERVER, free_port, running_monailabel  # noqa: E402
from wheel_env import clean_env, wheel_python  # noqa: E402

pytestmark = [pytest.mark.monailabel, pytest.mark.slow]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVED = [("unet", "msd_spleen"), ("swin", "btcv"), ("unet", "brats")]
NUM_CLASSES = {"btcv": 14, "msd_spleen": 2}
# tiny settings written into each served copy's inference.json (the defaults are the paper's GPU scale)
TINY = {
    "unet": {"features": [4, 4, 8, 8, 16, 4], "roi_size": [32, 32, 32]},
    "swin": {"feature_size": 12, "roi_size": [64, 64, 64], "downsample": "merging_legacy"},
}
# a served CT off the bundles' 1.5 x 1.5 x 2 mm grid, so that Spacingd resamples and Invertd has to undo it
SERVED_CT_SPACING = (1.2, 1.0, 2.5)
SERVER_START_S = 180
CPU_SERVED = "hybridmim_unet_msd_spleen_cpu"
INFER_TIMEOUT_S = 300


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)


def _run(args: list[str], what: str, cwd: str = REPO_ROOT, timeout: int = 600, env: dict | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{text[-6000:]}"
    return text


def _cli(overrides: dict) -> list[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _stack_brats_as_documented(case_dir: str, case: str, out: str) -> None:
    """Run the bundle README's snippet (one 4-channel NIfTI from the four sequences) in a BraTS case folder."""
    with open(os.path.join(REPO_ROOT, "bundles", bundle_name("unet", "brats"), "docs", "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("### MONAI Label"):]
    snippet = section[section.index("```python\n") + len("```python\n"):]
    snippet = snippet[: snippet.index("```")]
    documented_case = re.search(r'^case = "([^"]+)"$', snippet, re.M)
    assert documented_case, snippet
    snippet = snippet.replace(documented_case.group(0), f"case = {case!r}")
    _run([sys.executable, "-c", snippet], "the README's 4-channel NIfTI snippet", cwd=case_dir)
    shutil.move(os.path.join(case_dir, f"{case}.nii.gz"), out)


def _train_pack_download(backbone: str, task: str, python: str, model_dir: str, work: str, data_dir: str) -> str:
    """Train a tiny copy of the bundle in ``work``, pack it, download the zip into the app's model folder with the
    wheel's Python; returns the downloaded bundle folder (its configs hold the trained settings, amp off for a CPU)."""
    name = bundle_name(backbone, task)
    trained = os.path.join(work, "trained", name)
    shutil.copytree(os.path.join(REPO_ROOT, "bundles", name), trained)
    if task == "brats":
        datalist = make_brats_dataset(os.path.join(data_dir, name))
    else:
        datalist = make_ct_dataset(os.path.join(data_dir, name), num_classes=NUM_CLASSES[task])
    overrides = {
        "bundle_root": trained, "dataset_dir": os.path.dirname(datalist), "data_list_file_path": datalist,
        "pretrained_path": "", "amp": False, "num_samples": 1, "cache_rate": 0, "val_interval": 1,
        "train#dataloader#num_workers": 0, "train#trainer#max_epochs": 1, **TINY[backbone],
    }
    if backbone == "swin":
        overrides["use_checkpoint"] = False
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(trained, "configs", "train.json"),
          *_cli(overrides)], f"training {name}")
    zip_path = os.path.join(work, "dist", f"{name}.zip")
    _run([sys.executable, os.path.join(REPO_ROOT, "tools", "bundles", "pack_bundle.py"), trained, "--output", zip_path],
         f"packing {name}")
    _run([python, "-m", "monai.bundle", "download", "--name", name, "--url", "file://" + zip_path, "--bundle_dir",
          model_dir, "--progress", "False"], f"downloading {name}", cwd=work, env=clean_env())
    root = os.path.join(model_dir, name)
    inference = os.path.join(root, "configs", "inference.json")
    with open(inference) as f:
        cfg = json.load(f)
    for key, value in TINY[backbone].items():
        assert cfg[key] == value, f"the packed {name} does not carry the trained {key}: {cfg[key]!r}, not {value!r}"
    cfg["amp"] = False  # a CPU workstation (not a trained setting)
    with open(inference, "w") as f:
        json.dump(cfg, f, indent=4)
    assert os.path.isfile(os.path.join(root, "models", "model.pt"))
    return root


def _cli_inference(root: str, image, out_dir: str) -> str:
    """The label map the bundle's own inference.json writes for ``image`` (a path, or BraTS's four paths; MONAI CLI)."""
    datalist = os.path.join(out_dir, "datalist.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(datalist, "w") as f:
        json.dump({"testing": [{"image": image}]}, f)
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", os.path.join(root, "configs", "inference.json"),
          *_cli({"bundle_root": root, "dataset_dir": out_dir, "data_list_file_path": datalist,
                 "output_dir": out_dir, "dataloader#num_workers": 0})], f"CLI inference of {root}")
    first = image[0] if isinstance(image, list) else image
    return os.path.join(out_dir, os.path.basename(first)[: -len(".nii.gz")] + "_seg.nii.gz")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The ``monaibundle`` app with the three tiny bundles trained, packed and downloaded into its model folder."""
    work = tmp_path_factory.mktemp("monailabel")
    apps, data = str(work / "apps"), str(work / "data")
    python = wheel_python(str(work / "wheel"))  # the recipient's: the released package, no checkout
    # the sample app shipped in the MONAI Label wheel (copied from the installed package: no download; MONAI Label
    # finds its sample-apps under its environment's prefix, the test environment's)
    _run([sys.executable, START_SERVER, "apps", "--download", "--name", "monaibundle", "--output", apps],
         "monailabel apps --download")
    app_dir = os.path.join(apps, "monaibundle")
    model_dir = os.path.join(app_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    roots = {bundle_name(b, t): _train_pack_download(b, t, python, model_dir, str(work), data) for b, t in SERVED}
    # a copy served from its ONNX graph, as on a workstation without a GPU (tools/bundles/serve_on_cpu.py)
    cpu = os.path.join(model_dir, CPU_SERVED)
    shutil.copytree(roots[bundle_name("unet", "msd_spleen")], cpu)
    _run([sys.executable, os.path.join(REPO_ROOT, "tools", "bundles", "serve_on_cpu.py"), cpu], "serve_on_cpu")
    return {"dir": app_dir, "python": python, "roots": roots, "work": str(work), "data": data, "cpu": cpu}


@contextlib.contextmanager
def _server(app: dict, studies: str, models: list[str], log_path: str, env: dict | None = None):
    """A MONAI Label server (the wheel's Python, outside the checkout) serving ``models`` of the app from ``studies``
    (a folder or a DICOMweb URL); yields (URL, /info/); stopped when the block ends."""
    with running_monailabel(app["dir"], studies, models, log_path, python=app["python"], cwd=app["work"],
                            env=dict(clean_env(), **(env or {})), start_timeout_s=SERVER_START_S) as (url, info):
        yield url, info


@pytest.fixture(scope="module")
def served(app):
    """A running MONAI Label server with the three tiny bundles over a folder of NIfTI studies; yields its URL and
    paths; stopped at teardown."""
    work, data, roots = app["work"], app["data"], app["roots"]
    studies = os.path.join(work, "studies")
    os.makedirs(studies)
    ct_list = make_ct_dataset(os.path.join(data, "served_ct"), num_classes=2, shape=(40, 44, 36),
                              spacing=SERVED_CT_SPACING, n_train=1, n_val=1, n_test=1, seed=7)
    with open(ct_list) as f:
        ct_image = json.load(f)["testing"][0]["image"]
    shutil.copy(os.path.join(os.path.dirname(ct_list), ct_image), os.path.join(studies, "served_ct.nii.gz"))
    brats_list = make_brats_dataset(os.path.join(data, "served_brats"), n_train=1, n_val=1, n_test=1, seed=7)
    with open(brats_list) as f:
        brats_entry = json.load(f)["testing"][0]["image"]  # the four sequence files, T1, T1ce, T2, FLAIR
    case = os.path.basename(os.path.dirname(brats_entry[0]))
    brats_sequences = [os.path.join(os.path.dirname(brats_list), p) for p in brats_entry]
    _stack_brats_as_documented(os.path.join(os.path.dirname(brats_list), case), case,
                               os.path.join(studies, "served_brats.nii.gz"))
    log_path = os.path.join(work, "server.log")
    with _server(app, studies, [*roots, CPU_SERVED], log_path) as (url, info):
        yield {"url": url, "info": info, "roots": roots, "studies": studies, "work": work, "log": log_path,
               "brats_sequences": brats_sequences}


def _infer(served: dict, model: str, image_id: str, out: str) -> str:
    request = urllib.request.Request(f"{served['url']}/infer/{model}?image={image_id}&output=image", data=b"",
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=INFER_TIMEOUT_S) as r, open(out, "wb") as f:
            f.write(r.read())
    except urllib.error.HTTPError as e:
        with open(served["log"]) as f:
            pytest.fail(f"/infer/{model} answered {e.code}:\n{f.read()[-6000:]}")
    return out


def test_the_server_lists_the_bundles_with_their_labels(served):
    models = served["info"]["models"]
    assert set(served["roots"]) <= set(models), sorted(models)
    # MONAI Label names the values after channel_def; background is left out
    assert models["hybridmim_unet_msd_spleen"]["labels"] == {"spleen": 1}
    assert len(models["hybridmim_swin_btcv"]["labels"]) == 13
    assert models["hybridmim_unet_brats"]["labels"] == {
        "necrotic and non-enhancing tumour core": 1, "peritumoral oedema": 2, "enhancing tumour": 4}


@pytest.mark.parametrize("backbone,task", SERVED, ids=[bundle_name(b, t) for b, t in SERVED])
def test_infer_over_http_returns_the_bundles_label_map_on_the_input_grid(served, backbone, task):
    import nibabel as nib

    name = bundle_name(backbone, task)
    image_id = "served_brats" if task == "brats" else "served_ct"
    image = os.path.join(served["studies"], f"{image_id}.nii.gz")
    out = _infer(served, name, image_id, os.path.join(served["work"], f"{name}_server.nii.gz"))
    src, pred = nib.load(image), nib.load(out)
    assert pred.shape == src.shape[:3], (pred.shape, src.shape)
    np.testing.assert_allclose(pred.affine, src.affine, atol=1e-4)
    values = np.asarray(pred.dataobj)
    allowed = {0, 1, 2, 4} if TASKS[task]["sigmoid"] else set(range(len(TASKS[task]["classes"])))
    assert set(np.unique(values).tolist()) <= allowed, np.unique(values)
    # the same label map as the bundle's own inference.json through the MONAI CLI (BraTS: from the four sequence
    # files, the datalist form the bundle trains on, so the documented 4-channel NIfTI must hold them in that order)
    cli_input = served["brats_sequences"] if task == "brats" else image
    expected = nib.load(_cli_inference(served["roots"][name], cli_input, os.path.join(served["work"], f"{name}_cli")))
    np.testing.assert_array_equal(values, np.asarray(expected.dataobj))


def test_a_bundle_served_on_cpu_runs_its_onnx_graph(served):
    """The copy rewritten by serve_on_cpu.py: MONAI Label builds its network_def, an onnxruntime session that holds
    no tensors (MONAI Label says the checkpoint's keys do not match it, and loads nothing), and its label map is the
    PyTorch copy's (float32 both: logits differ by ~1e-5, so at most a few tie voxels may differ)."""
    import nibabel as nib

    with open(os.path.join(served["roots"]["hybridmim_unet_msd_spleen"], "..", CPU_SERVED, "configs",
                           "inference.json")) as f:
        assert json.load(f)["network_def"]["_target_"] == "hybridmim_components.workflow.OnnxNetwork"
    on_cpu = _infer(served, CPU_SERVED, "served_ct", os.path.join(served["work"], "cpu_server.nii.gz"))
    pytorch = _infer(served, "hybridmim_unet_msd_spleen", "served_ct", os.path.join(served["work"], "pt.nii.gz"))
    with open(served["log"]) as f:
        assert "Checkpoint keys don't match network.state_dict()" in f.read()
    a, b = np.asarray(nib.load(on_cpu).dataobj), np.asarray(nib.load(pytorch).dataobj)
    assert a.shape == b.shape
    assert np.mean(a == b) >= 0.999, f"{np.mean(a != b):.4%} of the voxels differ from the PyTorch copy's"


# ----------------------------------------------------------------------------------------------------- a real PACS
# Orthanc (Debian's orthanc, orthanc-dicomweb, orthanc-gdcm) on 127.0.0.1 holds two real CT series of the CancerData
# radiomics phantom (pyCERR's wheel on PyPI, CC BY-NC 3.0, tools/data/fetch_lung_ct.py): patient 1 uncompressed and
# patient 2 in JPEG-LS lossless (its public files compressed by the test; JPEG 2000: docs/pacs.md). MONAI Label reads them over DICOMweb
# (--studies), /infer segments them, and the label saved back (MONAI Label's PUT /datastore/label, tag final) must
# reach Orthanc as a DICOM SEG of the source series with the bundle's segment names and codes and the same voxels.
PACS_SERVED = [("unet", "msd_spleen", "uncompressed"), ("swin", "btcv", "jpegls")]


def _ct_files(folder: str) -> list[str]:
    import pydicom

    return sorted(p for p in (os.path.join(folder, f) for f in os.listdir(folder))
                  if pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT")


@pytest.fixture(scope="module")
def pacs(app):
    from tools.data.fetch_lung_ct import extract_patients, fetch_wheel
    from tools.monailabel.orthanc import (OrthancError, find_orthanc, lossless_copy, running_orthanc,
                                          series_problems, upload)

    try:
        find_orthanc()
    except OrthancError as e:  # CI installs Orthanc and sets HYBRIDMIM_REQUIRE_PACS: there a missing PACS fails
        if os.environ.get("HYBRIDMIM_REQUIRE_PACS"):
            pytest.fail(str(e))
        pytest.skip(str(e))
    work = os.path.join(app["work"], "pacs")
    folders, _ = extract_patients(fetch_wheel(), os.path.join(work, "dicom"))
    series = {"uncompressed": _ct_files(folders[0]),
              "jpegls": lossless_copy(_ct_files(folders[1]), os.path.join(work, "jpegls"), "jpegls")}
    for kind, files in series.items():
        assert series_problems(files) == [], (kind, series_problems(files))
    with running_orthanc(os.path.join(work, "orthanc"), free_port()) as orthanc:
        for files in series.values():
            upload(orthanc, files)
        log_path = os.path.join(work, "server.log")
        # MONAI Label's DICOMweb cache inside the test's folder (default: ~/.cache/monailabel/dicom, shared by runs)
        env = {"MONAI_LABEL_DICOMWEB_CACHE_PATH": os.path.join(work, "cache")}
        models = [bundle_name(b, t) for b, t, _ in PACS_SERVED]
        with _server(app, f"{orthanc}/dicom-web", models, log_path, env) as (url, info):
            yield {"url": url, "info": info, "orthanc": orthanc, "series": series, "roots": app["roots"],
                   "work": work, "log": log_path, "originals": _ct_files(folders[1])}


def _series_uid(files: list[str]) -> str:
    import pydicom

    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


@pytest.mark.pacs
def test_the_pacs_series_are_listed(pacs):
    """The datastore counts the two CT series (QIDO-RS, MONAI Label's CT filter), and "next sample" (what 3D Slicer's
    MONAI Label module asks for) hands out one of them by its SeriesInstanceUID."""
    with urllib.request.urlopen(f"{pacs['url']}/datastore/?output=stats", timeout=60) as r:
        stats = json.load(r)
    assert stats["total"] == 2, stats
    request = urllib.request.Request(f"{pacs['url']}/activelearning/first", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        sample = json.load(r)
    assert sample["id"] in {_series_uid(files) for files in pacs["series"].values()}, sample


@pytest.mark.pacs
def test_the_compressed_series_comes_back_from_the_pacs_with_its_pixels(pacs):
    """WADO-RS as MONAI Label asks for it (no transfer syntax: Explicit VR Little Endian): Orthanc decodes the JPEG-LS
    series it stores, and the pixels are the public originals'."""
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    files = pacs["series"]["jpegls"]
    stored = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    client = DICOMwebClient(f"{pacs['orthanc']}/dicom-web")
    retrieved = client.retrieve_series(str(stored.StudyInstanceUID), str(stored.SeriesInstanceUID))
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).pixel_array for p in pacs["originals"]}
    assert len(retrieved) == len(originals)
    for instance in retrieved:
        assert not instance.file_meta.TransferSyntaxUID.is_compressed
        np.testing.assert_array_equal(instance.pixel_array, originals[str(instance.SOPInstanceUID)])


def _slices(files: list[str]) -> list:
    """The CT slices sorted along the slice normal: (SOPInstanceUID, ImagePositionPatient, row dir, col dir, spacing)."""
    import pydicom

    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        out.append((str(ds.SOPInstanceUID), np.array(ds.ImagePositionPatient, dtype=float), iop[:3], iop[3:],
                    np.array(ds.PixelSpacing, dtype=float), (int(ds.Rows), int(ds.Columns))))
    normal = np.cross(out[0][2], out[0][3])
    return sorted(out, key=lambda s: float(s[1] @ normal))


def _label_on_dicom_grid(label_path: str, slices: list) -> np.ndarray:
    """The NIfTI label map sampled at every pixel centre of every DICOM slice, by world coordinates: (slices, rows,
    columns). An independent check of MONAI Label's geometry (LPS of DICOM -> RAS of NIfTI, slice order)."""
    import nibabel as nib

    img = nib.load(label_path)
    data = np.asarray(img.dataobj)
    inverse = np.linalg.inv(img.affine)
    rows, cols = slices[0][5]
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    out = np.zeros((len(slices), rows, cols), dtype=np.int64)
    for k, (_, ipp, row_dir, col_dir, spacing, _) in enumerate(slices):
        # PixelSpacing is (between rows, between columns); the first direction cosine runs along a row (columns)
        lps = ipp[None, None] + c[..., None] * spacing[1] * row_dir + r[..., None] * spacing[0] * col_dir
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(np.einsum("ab,rcb->rca", inverse[:3, :3], ras) + inverse[:3, 3]).astype(int)
        for axis in range(3):
            assert ijk[..., axis].min() >= 0 and ijk[..., axis].max() < data.shape[axis], \
                f"pixel centres of slice {k} fall outside the label map ({label_path})"
        out[k] = data[ijk[..., 0], ijk[..., 1], ijk[..., 2]]
    return out


def _seg_to_volume(seg, slices: list, value_of_segment: dict) -> np.ndarray:
    """The DICOM SEG's frames placed by their referenced source instance: (slices, rows, columns) of label values.
    Each frame's plane position must be the referenced slice's ImagePositionPatient (slice order and origin)."""
    index = {uid: k for k, (uid, *_rest) in enumerate(slices)}
    rows, cols = slices[0][5]
    out = np.zeros((len(slices), rows, cols), dtype=np.int64)
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    assert (int(seg.Rows), int(seg.Columns)) == (rows, cols), "the SEG's frames do not have the series' matrix"
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = index[str(source)]
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, slices[k][1], atol=1e-3, err_msg=f"frame of slice {k}: plane position")
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[k][frame > 0] = value_of_segment[segment]
    return out


@pytest.mark.pacs
@pytest.mark.parametrize("backbone,task,kind", PACS_SERVED, ids=[f"{bundle_name(b, t)}-{k}" for b, t, k in PACS_SERVED])
def test_pacs_series_is_segmented_and_saved_back_as_dicom_seg(pacs, backbone, task, kind):
    from dicomweb_client.api import DICOMwebClient
    from pydicom.dataset import Dataset

    from tools.monailabel.dicom_seg import save_label

    name = bundle_name(backbone, task)
    files = pacs["series"][kind]
    series_uid = _series_uid(files)
    slices = _slices(files)
    out = _infer(pacs, name, series_uid, os.path.join(pacs["work"], f"{name}_{kind}.nii.gz"))
    predicted = _label_on_dicom_grid(out, slices)  # also checks that the label map covers the whole series
    values = sorted(set(np.unique(predicted).tolist()) - {0})
    assert values, f"{name} found nothing in the {kind} series: no SEG to check"
    assert set(values) <= set(range(1, len(TASKS[task]["classes"]))), values

    answer = save_label(pacs["url"], series_uid, out, pacs["roots"][name])
    assert answer["image"] == series_uid, answer

    client = DICOMwebClient(f"{pacs['orthanc']}/dicom-web")
    segs = [Dataset.from_json(s) for s in client.search_for_series(search_filters={"Modality": "SEG"})]
    source = [s for s in client.search_for_series(search_filters={"SeriesInstanceUID": series_uid})]
    study_uid = str(Dataset.from_json(source[0]).StudyInstanceUID)
    mine = []
    for s in segs:
        for instance in client.retrieve_series(str(s.StudyInstanceUID), str(s.SeriesInstanceUID)):
            if str(instance.ReferencedSeriesSequence[0].SeriesInstanceUID) == series_uid:
                mine.append(instance)
    assert len(mine) == 1, f"{len(mine)} SEG objects in Orthanc reference series {series_uid}"
    seg = mine[0]
    assert seg.Modality == "SEG" and str(seg.StudyInstanceUID) == study_uid
    import pydicom

    source_ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert str(seg.FrameOfReferenceUID) == str(source_ds.FrameOfReferenceUID)
    assert str(seg.SeriesDescription) == name

    with open(os.path.join(pacs["roots"][name], "configs", "metadata.json")) as f:
        segments = json.load(f)["dicom_segments"]
    value_of_segment = {}
    for item in seg.SegmentSequence:
        label = str(item.SegmentLabel)
        value = [int(v) for v, s in segments.items() if s["label"] == label]
        assert len(value) == 1, f"segment {label!r} is not one of {name}'s ({sorted(s['label'] for s in segments.values())})"
        expected = segments[str(value[0])]
        assert str(item.SegmentedPropertyTypeCodeSequence[0].CodeValue) == expected["type"]["CodeValue"], label
        assert str(item.SegmentedPropertyCategoryCodeSequence[0].CodeValue) == expected["category"]["CodeValue"], label
        if "modifier" in expected:
            modifier = item.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
            assert str(modifier.CodeValue) == expected["modifier"]["CodeValue"], label
        value_of_segment[int(item.SegmentNumber)] = value[0]
    assert sorted(value_of_segment.values()) == values, (value_of_segment, values)
    np.testing.assert_array_equal(_seg_to_volume(seg, slices, value_of_segment), predicted)


def test_the_cpu_latency_benchmark_runs_at_a_tiny_size(served, tmp_path):
    """tools/benchmarks/benchmark_monailabel_cpu.py on a tiny trained bundle and the served CT: three copies served
    by one server, timed, and the float32 ONNX copy agrees with PyTorch."""
    root = served["roots"]["hybridmim_unet_msd_spleen"]
    out = tmp_path / "latency.json"
    _run([sys.executable, os.path.join(REPO_ROOT, "tools", "benchmarks", "benchmark_monailabel_cpu.py"),
          "--bundle", root, "--models", os.path.join(root, "models"), "--repeats", "1",
          "--image", os.path.join(served["studies"], "served_ct.nii.gz"), "--output", str(out)],
         "the MONAI Label CPU benchmark", timeout=900)
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"pytorch", "onnx", "onnx_fast"}
    assert all(len(r["seconds"]) == 1 and r["seconds"][0] > 0 for r in rows.values())
    assert rows["pytorch"]["voxels_differing"] == 0
    assert rows["onnx"]["voxels_differing"] <= 0.001 * rows["onnx"]["voxels"], rows["onnx"]
    assert len(result["server_latencies"]) == 3  # MONAI Label logged one request per copy
    assert (tmp_path / "latency.md").read_text().count("| onnx") == 2
