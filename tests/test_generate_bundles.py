"""The committed bundles are exactly what tools/bundles/generate_bundles.py writes, and all twelve share one skeleton."""
import json
import os

from tools.bundles.generate_bundles import all_bundles, differences, main

BUNDLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")
EXPECTED = {
    f"hybridmim_{b}_{t}"
    for b in ("swin", "unet")
    for t in ("pretrain", "pretrain_brats", "btcv", "msd_spleen", "msd_liver", "brats")
}
REQUIRED_FILES = [
    "configs/train.json",
    "configs/inference.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/metadata.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
]
SHARED_KEYS = [
    "bundle_root", "device", "dataset_dir", "data_list_file_path", "ckpt_dir", "output_dir", "roi_size",
    "network_def", "network", "val_interval", "amp", "resume",
]  # fmt: skip


def test_committed_bundles_match_the_generator():
    assert differences(BUNDLES_DIR) == [], "run: python tools/bundles/generate_bundles.py"


def test_check_mode_reports_a_hand_edit(tmp_path):
    main(["--bundles-dir", str(tmp_path)])
    assert main(["--check", "--bundles-dir", str(tmp_path)]) == 0
    path = tmp_path / "hybridmim_unet_btcv" / "configs" / "train.json"
    path.write_text(path.read_text().replace('"amp"', '"amp_edited"'))
    assert main(["--check", "--bundles-dir", str(tmp_path)]) == 1


def test_twelve_bundles_with_the_contract_files_and_keys():
    bundles = all_bundles()
    assert set(bundles) == EXPECTED
    for name, files in bundles.items():
        for rel in REQUIRED_FILES:
            assert rel in files, f"{name} lacks {rel}"
        train = json.loads(files["configs/train.json"])
        for key in SHARED_KEYS:
            assert key in train, f"{name}/configs/train.json lacks {key}"
        width = "feature_size" if "_swin_" in name else "features"
        assert width in train and f"@{width}" in json.dumps(train["network_def"]), name
        extra = ["sub_volume_size", "patch_size", "mask_ratio", "region_size", "loss"] if "pretrain" in name else [
            "pretrained_path", "label_fraction"]  # fmt: skip
        for key in extra:
            assert key in train, f"{name}/configs/train.json lacks {key}"
