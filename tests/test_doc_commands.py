"""Every shell command of README.md and docs/*.md is run here as written, or mapped to the test or CI step covering it.

1. :func:`doc_commands` reads the fenced ```bash blocks of README.md and of the top-level docs/*.md (docs/experiments/**
   are generated reports): continuation lines joined, comments dropped, ``a && b`` split, ``cd <dir>`` turned into the
   working directory of the block's following commands.
2. :data:`COVERAGE` maps each command (a regex on ``"<working dir>: <command>"``, whitespace collapsed) either to
   ``run(...)``: a test below runs the documented text through ``shlex.split``, with ``/data`` replaced by generated
   data in tmp_path, ``$PWD`` by the working directory, ``python`` by this interpreter, and the listed tiny overrides
   appended; or to ``covered_by(...)``: the test (or ``.ci/run`` step) that covers it, and why it is not run here.
   A new documented command that matches no entry fails :func:`test_every_documented_command_is_covered`. A command
   shown both in the README and on its docs/ page runs once, where it first appears (README.md, then docs/*.md).

Commands run in a scratch copy of the checkout (``tools`` linked, the bundles they write into copied), never in the
repository itself.
"""
from __future__ import annotations

import configparser
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, REPO_ROOT) for p in glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
SHELL_FENCES = ("bash", "sh", "shell", "console")
TIMEOUT = 600


# ----------------------------------------------------------------------------------------------------------- parser
@dataclass(frozen=True)
class Command:
    file: str  # relative to the repository
    line: int  # first line of the command in the file
    cwd: str  # working directory relative to the repository root ("." for the root)
    text: str  # the command, continuation lines joined, comment removed

    @property
    def key(self) -> str:
        return f"{self.cwd}: {' '.join(self.text.split())}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line} [{self.cwd}] {self.text}"


def _outside_quotes(text: str):
    """Yield ``(index, char, quoted)`` for each char, ``quoted`` when inside '...' or "..."."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            yield i, ch, True
        elif ch in "'\"":
            quote = ch
            yield i, ch, True
        else:
            yield i, ch, False


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``  # comment``: a ``#`` outside quotes, after whitespace, before a space or the end
    (so ``train#trainer#max_epochs`` and ``"a # b"`` stay)."""
    for i, ch, quoted in _outside_quotes(line):
        if ch == "#" and not quoted and (i == 0 or line[i - 1].isspace()) and (i + 1 == len(line) or line[i + 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def split_and(line: str) -> List[str]:
    """``a && b`` -> ``["a", "b"]`` (``&&`` inside quotes is kept)."""
    parts, start = [], 0
    for i, ch, quoted in _outside_quotes(line):
        if not quoted and line.startswith(" && ", i) and i >= start:
            parts.append(line[start:i].strip())
            start = i + 4
    parts.append(line[start:].strip())
    return [p for p in parts if p]


def parse_commands(markdown: str, file: str = "<text>") -> List[Command]:
    """The commands of the shell-fenced blocks of ``markdown``."""
    commands: List[Command] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*```(\w*)\s*$", lines[i])
        i += 1
        if not fence:
            continue
        is_shell = fence.group(1) in SHELL_FENCES
        cwd, pending, pending_line = ".", "", 0
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            raw, number = lines[i].strip(), i + 1
            i += 1
            if not is_shell:
                continue
            if pending:
                raw, number = pending + " " + raw, pending_line
                pending = ""
            if raw.endswith("\\"):
                pending, pending_line = raw[:-1].rstrip(), number
                continue
            if raw.startswith("#"):
                continue
            for part in split_and(strip_comment(raw)):
                words = shlex.split(part)
                if words and words[0] == "cd":
                    cwd = os.path.normpath(os.path.join(cwd, words[1]))
                else:
                    commands.append(Command(file, number, cwd, part))
        i += 1  # closing fence
    return commands


def doc_commands() -> List[Command]:
    commands = []
    for file in DOC_FILES:
        with open(os.path.join(REPO_ROOT, file), encoding="utf-8") as f:
            commands += parse_commands(f.read(), file)
    return commands


# --------------------------------------------------------------------------------------------------- coverage table
@dataclass(frozen=True)
class Run:
    group: str  # the test that runs it: "datalist", "rtstruct" (fast) or "bundles" (slow)
    extra: Tuple[str, ...] = ()  # tiny overrides appended to the documented arguments
    expect: Tuple[str, ...] = ()  # text its output must contain
    absent: Tuple[str, ...] = ()  # text its output must not contain
    creates: Tuple[str, ...] = ()  # globs (relative to its working dir) that must exist afterwards


@dataclass(frozen=True)
class CoveredBy:
    targets: Tuple[str, ...]  # "tests/test_x.py::test_name" or ".ci/run"
    why: str
    expect: str = ""  # for ".ci/run": text the script must contain ("{0}" = the pattern's first group)
    help: bool = False  # also run "<program> --help" here: the entry point exists and parses


def run(group: str, extra: Sequence[str] = (), expect: Sequence[str] = (), absent: Sequence[str] = (),
        creates: Sequence[str] = ()) -> Run:
    return Run(group, tuple(extra), tuple(expect), tuple(absent), tuple(creates))


def covered_by(targets, why: str, expect: str = "", help: bool = False) -> CoveredBy:
    return CoveredBy((targets,) if isinstance(targets, str) else tuple(targets), why, expect, help)


UNET = ("--features", "[4,4,8,8,16,4]")
NO_AMP = ("--amp", "false")
PRETRAIN_TINY = (*UNET, "--roi_size", "[64,64,64]", "--region_size", "[32,32,32]", "--steps_per_epoch", "2",
                 "--train#trainer#max_epochs", "1", "--train#dataloader#num_workers", "0",
                 "--validate#dataloader#num_workers", "0", "--batch_size", "1", "--samples_per_volume", "1",
                 "--val_interval", "1", *NO_AMP)
FINETUNE_TINY = (*UNET, "--roi_size", "[32,32,32]", "--num_samples", "1", "--cache_rate", "0",
                 "--train#dataloader#num_workers", "0", "--val_interval", "1", "--train#trainer#max_epochs", "1",
                 *NO_AMP)
EVALUATE_TINY = (*UNET, "--roi_size", "[32,32,32]", "--cache_rate", "0", "--train#dataloader#num_workers", "0",
                 *NO_AMP)
INFERENCE_TINY = (*UNET, "--roi_size", "[32,32,32]", "--dataloader#num_workers", "0", *NO_AMP)

PRETRAIN = "bundles/hybridmim_unet_pretrain"
BTCV = "bundles/hybridmim_unet_btcv"
PREP = r"python tools/data/prepare_datalist\.py"
BUNDLE_RUN = r"python -m monai\.bundle run"
T_PRETRAIN = "tests/test_pretrain_bundles.py"
T_EXPERIMENTS = "tests/test_experiments.py"
T_STUDY = "tests/test_patient_study.py"
T_MULTINODE = "tests/test_multinode.py"

#: (regex, full match on Command.key, what covers it); the first matching entry counts
COVERAGE: List[Tuple[str, object]] = [
    # ---- set up and test (README quick start, "Test") -----------------------------------------------------------
    (r"\.: python3 -m venv \.venv", covered_by(".ci/run", "CI makes the same environment", expect="-m venv .venv")),
    (r"\.: \. \.venv/bin/activate", covered_by(".ci/run", "CI calls .venv/bin/python instead of activating",
                                               expect=".venv/bin/python -m pip")),
    (r"\.: pip install (torch==[0-9.]+)", covered_by(".ci/run", "CI installs the same torch first",
                                                     expect="pip install -q {0}")),
    (r'\.: pip install -e "\.\[tools\]"', covered_by(".ci/run", 'CI installs ".[test]", which holds every package of '
                                                     '".[tools]" (test_the_test_extra_holds_the_tools_extra)',
                                                     expect='pip install -q -e ".[test]"')),
    (r'\.: pip install -e "\.\[test\]"', covered_by(".ci/run", "CI's install step", expect='pip install -q -e ".[test]"')),
    (r"\.: python -m pytest -n 2 tests", covered_by(".ci/run", "CI's test step", expect="-m pytest -n 2 tests")),
    # ---- the next MONAI (docs/compatibility.md "The next MONAI"): CI step 5 makes the same side environment ---------
    (r"\.: (python3 -m venv \.venv-weekly|\.venv-weekly/bin/python -m pip (install|uninstall) .*)",
     covered_by(".ci/run", "CI step 5 makes the same environment in the same order and runs its tests there",
                expect="-m pip uninstall -q -y monai")),
    # ---- MONAI Label (docs/running.md "MONAI Label") ---------------------------------------------------------------
    (r"\.: pip install --no-deps -r tools/monailabel/requirements\.txt", covered_by(
        ".ci/run", "CI installs the same file into both environments",
        expect="pip install -q --no-deps -r tools/monailabel/requirements.txt")),
    (r"\.: python tools/bundles/serve_on_cpu\.py apps/monaibundle/model/\S+( --fast)?", covered_by(
        ["tests/test_monailabel_server.py::test_a_bundle_served_on_cpu_runs_its_onnx_graph",
         "tests/test_serve_on_cpu.py::test_inference_json_runs_the_onnx_graph_and_keeps_the_pytorch_config"],
        "a real server serves a copy rewritten by the command (export included) next to the PyTorch copy; the config "
        "it writes, --fast included, is checked without an export")),
    (r"\.: python tools/benchmarks/benchmark_monailabel_cpu\.py .*", covered_by(
        "tests/test_monailabel_server.py::test_the_cpu_latency_benchmark_runs_at_a_tiny_size",
        "the benchmark on a tiny trained bundle and a small CT (the documented run takes minutes per scan)")),
    # ---- MONAI Label with a PACS (docs/pacs.md): Orthanc from Debian, DICOMweb, DICOM SEG ------------------------
    (r"\.: sudo apt-get install orthanc orthanc-dicomweb orthanc-gdcm", covered_by(
        ".ci/run", "CI step 0 installs the same Debian packages", expect="orthanc orthanc-dicomweb orthanc-gdcm")),
    (r"\.: (python tools/monailabel/orthanc\.py (serve|upload) .*|python tools/monailabel/start_server\.py "
     r"start_server .*--studies http://127\.0\.0\.1:8042/dicom-web .*|python tools/monailabel/dicom_seg\.py .*)",
     covered_by("tests/test_monailabel_server.py::test_pacs_series_is_segmented_and_saved_back_as_dicom_seg",
                "a real PACS: the test starts Orthanc with the same configuration (running_orthanc, what `serve` runs), "
                "uploads two real CT series (upload), starts MONAI Label on its DICOMweb URL, and saves the label with "
                "dicom_seg.save_label (what the command runs); CI runs it with MONAI 1.6.1 (step 4)")),
    (r"\.: python tools/monailabel/orthanc\.py check /data/ct_series", covered_by(
        "tests/test_dicom_seg.py::test_the_check_command_names_what_a_series_lacks",
        "the command on generated slices: one series that passes, one that lacks its FrameOfReferenceUID")),
    (r"\.: (python tools/monailabel/start_server\.py (apps --download|start_server) .*|cp -r "
     r"bundles/\S+ apps/monaibundle/model/)", covered_by(
        "tests/test_monailabel_server.py::test_infer_over_http_returns_the_bundles_label_map_on_the_input_grid",
        "a real server: the test copies the sample app, puts trained tiny bundle copies in its model folder, starts "
        "it on a free port and requests /infer (CI runs it on MONAI 1.5.1 and 1.6.1; skipped without monailabel)")),
    (r"\.: python tools/demo\.py", covered_by(
        "tests/test_demo.py::test_demo_runs_and_reports_pretext_metrics_dice_and_pictures",
        "the defaults take minutes (the README reports a measured run); the test runs the same script on the same "
        "real CT with 4 pretraining and 2 finetuning steps")),
    # ---- datalists (README "Running a bundle on your data", 1; DICOM: docs/running.md) ---------------------------
    (rf"\.: {PREP} btcv /data/btcv", run("datalist", expect=["training 24, validation 6, testing 2"])),
    (rf"\.: {PREP} msd /data/Task09_Spleen", run("datalist", expect=["training 4, validation 1, testing 2"])),
    (rf"\.: {PREP} brats /data/BraTS2020", run("datalist", expect=["training 4, validation 1"])),
    (rf"\.: {PREP} pool /data/ct_a /data/ct_b --dataset_dir /data", run("datalist", expect=["training 5, validation 1"])),
    (rf"\.: {PREP} pool /data/ct_a --dataset_dir /data --exclude /data/btcv/datalist\.json",
     run("datalist", expect=["excluded 1 file(s)", "copy_of_btcv_0035.nii.gz", "training 2, validation 1"])),
    (r"\.: python tools/data/rtstruct_to_nifti\.py --series /data/pat1/CT .*",
     run("rtstruct", creates=["pat1_ct.nii.gz", "pat1_gtv.nii.gz"])),
    # ---- pretrain, finetune (README 2, 3), "Share a trained bundle": one chain, in document order (slow) --------
    (rf"{PRETRAIN}: {BUNDLE_RUN} --config_file configs/train\.json --dataset_dir /data",
     run("bundles", PRETRAIN_TINY, expect=["Epoch[1] Complete"], creates=["models/model.pt"])),
    (rf"{PRETRAIN}: torchrun --nproc_per_node=\d+ -m monai\.bundle run --config_file "
     r"\"\['configs/train\.json','configs/multi_gpu_train\.json'\]\" --dataset_dir /data",
     covered_by(f"{T_PRETRAIN}::test_pretrain_multi_gpu_config_two_cpu_processes",
                "needs several GPUs; the test runs the same two configs under torchrun with 2 CPU processes (gloo)")),
    # ---- several GPUs and nodes, GPU check, step cost (README, docs/multi_gpu.md) ---------------------------------
    (rf"{PRETRAIN}: torchrun --nnodes \d+ --nproc_per_node \d+ --rdzv_backend c10d --rdzv_endpoint \S+:\d+ "
     r"--rdzv_id \S+ -m monai\.bundle run --config_file \"\['configs/train\.json','configs/multi_gpu_train\.json'\]\" "
     r"--dataset_dir /data",
     covered_by([f"{T_MULTINODE}::test_two_nodes_gather_negatives_and_shard_the_pool",
                 f"{T_MULTINODE}::test_pretrain_bundle_trains_as_two_nodes_through_the_slurm_script"],
                "needs several machines; the tests start 2 nodes x 1 process here with the same torchrun options "
                "(c10d rendezvous, gloo) and train the bundle's two configs as 2 nodes")),
    (r"\.: sbatch --nodes \d+ --gpus-per-node \d+ tools/slurm/pretrain\.sbatch bundles/\S+ \S+",
     covered_by([f"{T_MULTINODE}::test_slurm_script_starts_one_torchrun_per_node_without_slurm_job_id",
                 f"{T_MULTINODE}::test_pretrain_bundle_trains_as_two_nodes_through_the_slurm_script"],
                "needs a SLURM cluster; the tests run the script with srun/scontrol stand-ins: the torchrun each node "
                "gets, and the bundle trained as 2 nodes through it")),
    (r"\.: python tools/gpu_check\.py", covered_by(
        "tests/test_gpu_check.py::test_cpu_run_is_tiny_says_so_and_its_figures_are_sane",
        "paper settings need a GPU (and write tools/results/); the test runs the same command on CPU, where it "
        "chooses tiny settings by itself", help=True)),
    (r"\.: python tools/benchmarks/compute_step_cost\.py", covered_by(
        "tests/test_step_cost.py::test_cli_writes_json_and_markdown",
        "writes the committed tools/benchmarks/results/step_cost.*; the test runs the same CLI on tiny settings into "
        "tmp_path", help=True)),
    (rf"{BTCV}: {BUNDLE_RUN} --config_file configs/train\.json --dataset_dir /data/btcv",
     run("bundles", FINETUNE_TINY, expect=["pretrained weights ./../hybridmim_unet_pretrain/models/model.pt",
                                           "unexpected: 0", "Epoch[1] Complete"], creates=["models/model.pt"])),
    (rf"{BTCV}: {BUNDLE_RUN} --config_file configs/train\.json --dataset_dir /data/btcv --pretrained_path \"\"",
     run("bundles", FINETUNE_TINY, expect=["training from scratch", "Epoch[1] Complete"],
         absent=["pretrained weights ./"])),
    (rf"{BTCV}: {BUNDLE_RUN} --config_file \"\['configs/train\.json','configs/evaluate\.json'\]\" "
     r"--dataset_dir /data/btcv", run("bundles", EVALUATE_TINY, expect=["val_mean_dice"], creates=["eval/metrics.csv"])),
    (rf"{BTCV}: {BUNDLE_RUN} --config_file configs/inference\.json --dataset_dir /data/btcv",
     run("bundles", INFERENCE_TINY, creates=["eval/*_seg.nii.gz"])),
    (r"\.: python tools/bundles/pack_bundle\.py bundles/hybridmim_unet_btcv --version \S+ --changelog .*",
     run("bundles", expect=["trained settings written into the configs", "features: [32, 32, 64, 128, 256, 32] ->"],
         creates=["dist/hybridmim_unet_btcv_v*.zip"])),
    (r"\.: python -m monai\.bundle download --name hybridmim_unet_btcv --url file://\$PWD/dist/\S+\.zip "
     r"--bundle_dir downloaded", run("bundles", creates=["downloaded/hybridmim_unet_btcv/models/model.pt",
                                                         "downloaded/hybridmim_unet_btcv/models/model.provenance.json"])),
    # the downloaded finetune runs with nothing but the data's location (and this CPU's runtime): no width override
    (rf"\.: {BUNDLE_RUN} --config_file downloaded/hybridmim_unet_btcv/configs/inference\.json "
     r"--bundle_root downloaded/hybridmim_unet_btcv --dataset_dir /data/btcv",
     run("bundles", ("--dataloader#num_workers", "0", *NO_AMP),
         expect=["match the ones the weights were trained with"],
         creates=["downloaded/hybridmim_unet_btcv/eval/*_seg.nii.gz"])),
    (r"\.: python tools/bundles/pack_bundle\.py bundles/hybridmim_unet_pretrain --version \S+ --changelog .*",
     run("bundles", creates=["dist/hybridmim_unet_pretrain_v*.zip"])),
    (r"\.: python -m monai\.bundle download --name hybridmim_unet_pretrain --url file://\$PWD/dist/\S+\.zip "
     r"--bundle_dir downloaded", run("bundles", creates=["downloaded/hybridmim_unet_pretrain/models/model.pt",
                                                         "downloaded/hybridmim_unet_pretrain/large_files.yml"])),
    (rf"\.: {BUNDLE_RUN} --config_file bundles/hybridmim_unet_msd_spleen/configs/train\.json "
     r"--dataset_dir /data/Task09_Spleen --pretrained_path downloaded/hybridmim_unet_pretrain",
     run("bundles", FINETUNE_TINY, expect=["pretrained weights downloaded/hybridmim_unet_pretrain/models/model.pt",
                                           "sha256 ", "unexpected: 0", "Epoch[1] Complete"])),
    # ---- publishing on the Hugging Face Hub (docs/sharing.md): needs a Hub account and the network -----------------
    (r"\.: python tools/bundles/publish_hf\.py \S+\.zip --repo \S+",
     covered_by("tests/test_publish_hf.py::test_first_publish_uploads_the_zoo_layout_and_tags_the_version",
                "the test runs the same command line (main) on a packed zip, huggingface_hub's calls patched onto an "
                "in-memory Hub (no account, no network in CI)", help=True)),
    (r"\.: python -m monai\.bundle download --name hybridmim_unet_pretrain --source huggingface_hub --repo \S+ "
     r"--version \S+ --bundle_dir downloaded",
     covered_by("tests/test_publish_hf.py::test_the_recipient_downloads_it_with_monai",
                "MONAI's download from the in-memory Hub the test publishes to, with and without --version")),
    # ---- pretraining on a large pool (README, docs/pool_store.md) --------------------------------------------------
    (r"\.: python tools/data/preprocess_pool\.py bundles/hybridmim_swin_pretrain /data/pool_store --dataset_dir /data",
     covered_by("tests/test_pool_store.py::test_a_corrupt_file_is_named_and_skipped_and_the_rest_stored",
                "the test runs the same command line (main) on generated CTs with a tiny crop override", help=True)),
    (r"bundles/hybridmim_swin_pretrain: python -m monai\.bundle run --config_file "
     r"\"\['configs/train\.json','configs/pool_store\.json'\]\" --dataset_dir /data --check_data false",
     covered_by("tests/test_pool_store.py::test_a_pretraining_bundle_trains_from_the_store_through_the_cli",
                "the test trains the UNet twin (the same pool_store.json) from a store with tiny overrides")),
    (r"bundles/hybridmim_swin_pretrain: torchrun --nproc_per_node=\d+ -m monai\.bundle run --config_file "
     r"\"\['configs/train\.json','configs/multi_gpu_train\.json','configs/pool_store\.json'\]\" "
     r"--dataset_dir /data --check_data false",
     covered_by("tests/test_pool_store.py::test_a_pretraining_bundle_trains_from_the_store_under_two_process_ddp",
                "needs several GPUs; the test runs the same three configs under torchrun with 2 CPU processes")),
    (r"\.: python tools/benchmarks/benchmark_pool_store\.py --n_small \d+ --n_large \d+",
     covered_by("tests/test_pool_store.py::test_the_benchmark_runs_at_a_tiny_size",
                "writes a 21 GB simulated pool and runs for tens of minutes; the test runs it on 3 tiny CTs",
                help=True)),
    # ---- CPU inference with ONNX (README, docs/onnx.md) -------------------------------------------------------------
    (rf"{BTCV}: python -m monai\.bundle onnx_export network_def --filepath models/model\.onnx "
     r"--ckpt_file models/model\.pt .*--input_shape \"\[2, 1, 96, 96, 96\]\" --converter_kwargs .*",
     covered_by("tests/test_onnx_export.py::test_onnx_export_and_parity",
                "needs a trained models/model.pt; the test runs each bundle README's same command (tiny width, "
                "smaller patch) and checks onnxruntime against PyTorch")),
    (rf"{BTCV}: {BUNDLE_RUN} --config_file \"\['configs/inference\.json','configs/inference_onnx\.json'\]\" "
     r"--dataset_dir /data/btcv",
     covered_by("tests/test_onnx_export.py::test_onnx_export_and_parity",
                "needs the exported models/model.onnx; the test runs both configs on a crop of the real demo CT and "
                "compares the label maps")),
    # ---- a whole CT on the CPU (docs/cpu_inference.md) ----------------------------------------------------------------
    (rf"{BTCV}: {BUNDLE_RUN} --config_file \"\['configs/inference\.json','configs/inference_onnx\.json',"
     r"'configs/inference_cpu_fast\.json'\]\" --dataset_dir /data/btcv",
     covered_by("tests/test_cpu_inference.py::test_cpu_fast_layer_reaches_inferer_and_session",
                "needs a trained, exported models/model.onnx; the test parses the same three configs as MONAI merges "
                "them and checks that the layer's overlap, batch and quantization reach the inferer and the "
                "onnxruntime session (the rest is inference_onnx.json's pipeline, run by tests/test_onnx_export.py)")),
    (r"\.: python tools/benchmarks/benchmark_whole_ct\.py .*",
     covered_by("tests/test_cpu_inference.py::test_benchmark_combine_recomputes_agreement_against_a_reference_run_earlier",
                "runs whole CTs at the default widths with trained weights (over an hour on 2 cores); the test runs "
                "its --combine step on small label maps", help=True)),
    (r"\.: python tools/benchmarks/benchmark_onnx_inference\.py .*",
     covered_by("tests/test_onnx_export.py::test_benchmark_runs_at_tiny_width",
                "times SwinUNETR and BasicUNet at their default widths (~20 min on 2 cores); the test runs it on a "
                "tiny UNet", help=True)),
    # ---- experiments (docs/experiments.md) ------------------------------------------------------------------------
    (r"\.: python -m tools\.experiments\.label_efficiency --small", covered_by(
        f"{T_EXPERIMENTS}::test_label_efficiency_end_to_end_is_reproducible_and_resumes",
        "the small preset trains several bundles (minutes); the test runs it with fewer fractions and seeds",
        help=True)),
    # ---- starting from public weights (README, docs/public_weights.md) -------------------------------------------
    (rf"\.: {BUNDLE_RUN} --config_file bundles/hybridmim_swin_(btcv|pretrain)/configs/train\.json --dataset_dir \S+ "
     r"--pretrained_path /weights/model_swinvit\.pt --pretrained_scope encoder --downsample merging_legacy",
     covered_by(["tests/test_public_weights_cli.py::test_pretraining_warm_starts_from_a_public_layout_through_the_cli",
                 "tests/test_public_weights_cli.py::test_import_weights_then_finetune_from_the_result"],
                "needs the published file; the tests build files with its exact keys and run the bundles with them")),
    (r"\.: python tools/weights/import_weights\.py /weights/model_swinvit\.pt --out \S+ --scope encoder",
     covered_by("tests/test_public_weights_cli.py::test_import_weights_then_finetune_from_the_result",
                "needs the published file; the test converts one with its exact keys and finetunes from the result",
                help=True)),
    (r"\.: python -m tools\.experiments\.(loss_ablation|settings) --small", covered_by(
        f"{T_EXPERIMENTS}::test_loss_ablation_and_settings_end_to_end",
        "the small preset trains a bundle per row (minutes); the test runs it with two rows / two settings",
        help=True)),
    (r"\.: python -m tools\.experiments\.patient_study", covered_by(
        [f"{T_STUDY}::test_small_preset_end_to_end_with_a_leaking_pool_and_resume",
         f"{T_STUDY}::test_cpu_preset_is_the_default_without_task_and_spreads_steps_over_cases"],
        "downloads 4 patients and trains for ~48 min; the tests run the same study on synthetic patients (small "
        "preset) and check what the default preset sets", help=True)),
    (r"\.: python -m tools\.experiments\.patient_study --task \S+ --pool \S+ --folds \d+ --seeds \d+ --device cuda",
     covered_by([f"{T_STUDY}::test_paper_preset_overrides_only_paths_seeds_device_and_the_no_selection_rule",
                 f"{T_STUDY}::test_cuda_requested_without_a_gpu_fails_before_any_download"],
                "needs the user's data and a GPU; the tests check the overrides this preset passes to the bundles "
                "and the refusal without a GPU")),
]


def coverage_of(command: Command):
    """``(entry index, re.Match, action)`` of the first entry matching ``command``, else ``None``."""
    for index, (pattern, action) in enumerate(COVERAGE):
        m = re.fullmatch(pattern, command.key)
        if m:
            return index, m, action
    return None


def commands_of(group: str) -> List[Tuple[Command, Run]]:
    """The group's commands in document order, each (working dir and text) once: where it first appears."""
    out, seen = [], set()
    for command in doc_commands():
        found = coverage_of(command)
        if found and isinstance(found[2], Run) and found[2].group == group and command.key not in seen:
            seen.add(command.key)
            out.append((command, found[2]))
    return out


# ---------------------------------------------------------------------------------------------------------- running
def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    e["PYTHONPATH"] = REPO_ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.pop("BUNDLE_DOWNLOAD_SRC", None)  # `--url` must work whatever the user's default source is
    return e


def argv_of(command: Command, data_root: str, cwd: str, extra: Sequence[str] = ()) -> List[str]:
    """The documented command as argv: ``$PWD`` -> ``cwd``, ``/data`` -> ``data_root``, ``python`` -> this
    interpreter, ``extra`` appended."""
    argv = shlex.split(command.text.replace("$PWD", cwd))
    argv = [re.sub(r"(?<![\w/.])/data(?=/|$)", lambda _: data_root, a) for a in argv]
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv + list(extra)


def make_workspace(root: str, bundles: Sequence[str] = ()) -> str:
    """A scratch checkout: ``tools`` linked to the repository's, ``bundles/<name>`` copied (without weights or
    outputs), so that commands writing next to them (``bundle_root "."``, ``dist/``) never touch the repository."""
    os.makedirs(root, exist_ok=True)
    os.symlink(os.path.join(REPO_ROOT, "tools"), os.path.join(root, "tools"))
    for name in bundles:
        shutil.copytree(os.path.join(REPO_ROOT, "bundles", name), os.path.join(root, "bundles", name),
                        ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "runs", "__pycache__"))
    return root


def run_documented(group: str, workspace: str, data_root: str) -> List[Command]:
    """Run the group's documented commands in document order, checking each one's expectations."""
    done = []
    for command, action in commands_of(group):
        cwd = os.path.normpath(os.path.join(workspace, command.cwd))
        argv = argv_of(command, data_root, cwd, action.extra)
        proc = subprocess.run(argv, cwd=cwd, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
        text = proc.stdout + proc.stderr
        where = f"{command}\nran as: {shlex.join(argv)}\n(cwd {cwd})"
        assert proc.returncode == 0, f"documented command failed (exit {proc.returncode}):\n{where}\n{text[-6000:]}"
        for s in action.expect:
            assert s in text, f"{where}\noutput lacks {s!r}:\n{text[-4000:]}"
        for s in action.absent:
            assert s not in text, f"{where}\noutput holds {s!r}:\n{text[-4000:]}"
        for pattern in action.creates:
            assert glob.glob(os.path.join(cwd, pattern)), f"{where}\ndid not create {pattern}"
        done.append(command)
    assert done, f"no documented command in group {group!r}"
    return done


# ------------------------------------------------------------------------------------------------- coverage checks
def test_parser_joins_continuations_strips_comments_splits_and_follows_cd():
    text = "\n".join([
        "```bash",
        "# a comment line",
        "cd bundles/b && python -m x --a#b#c 1 \\",
        "    --msg \"keep # this\"   # drop this",
        "python y.py 'a && b' && python z.py#not-a-comment",
        "```",
        "```",
        "not a shell block",
        "```",
        "   ```bash",
        "   python w.py",
        "   ```",
    ])
    assert [(c.cwd, c.text, c.line) for c in parse_commands(text)] == [
        ("bundles/b", 'python -m x --a#b#c 1 --msg "keep # this"', 3),
        ("bundles/b", "python y.py 'a && b'", 5),
        ("bundles/b", "python z.py#not-a-comment", 5),
        (".", "python w.py", 11),
    ]


def test_a_command_documented_in_the_readme_and_a_docs_page_runs_once(monkeypatch):
    """The README's short block and its docs/ page may show the same command: the run groups run it once, where it
    first appears (README.md, then docs/*.md in name order)."""
    block = "```bash\ncd bundles/x\npython tools/data/prepare_datalist.py btcv  /data/btcv\n```\n"
    commands = parse_commands(block, "README.md") + parse_commands("text\n" + block, "docs/page.md")
    assert [c.key for c in commands] == ["bundles/x: python tools/data/prepare_datalist.py btcv /data/btcv"] * 2
    commands = [Command(c.file, c.line, ".", c.text) for c in commands]  # as the README's datalist block
    monkeypatch.setattr(sys.modules[__name__], "doc_commands", lambda: commands)
    assert [(c.file, c.line) for c, _ in commands_of("datalist")] == [("README.md", 3)]


def test_every_documented_command_is_covered():
    commands = doc_commands()
    assert len(commands) >= 20, [str(c) for c in commands]  # the parser found the README's blocks
    uncovered = [str(c) for c in commands if coverage_of(c) is None]
    assert not uncovered, ("documented commands that no test runs and COVERAGE does not map (add a run(...) or "
                           "covered_by(...) entry in tests/test_doc_commands.py):\n" + "\n".join(uncovered))
    used = {coverage_of(c)[0] for c in commands}
    stale = [COVERAGE[i][0] for i in range(len(COVERAGE)) if i not in used]
    assert not stale, "COVERAGE entries that match no documented command (remove or update them):\n" + "\n".join(stale)


def test_covered_by_targets_exist():
    problems = []
    for command in doc_commands():
        _, m, action = coverage_of(command)
        if not isinstance(action, CoveredBy):
            continue
        for target in action.targets:
            if target == ".ci/run":
                with open(os.path.join(REPO_ROOT, ".ci", "run"), encoding="utf-8") as f:
                    script = f.read()
                expect = action.expect.format(*m.groups())
                if not expect or expect not in script:
                    problems.append(f"{command}: .ci/run does not contain {expect!r}")
                continue
            path, _, name = target.partition("::")
            full = os.path.join(REPO_ROOT, path)
            if not os.path.isfile(full):
                problems.append(f"{command}: {path} not found")
                continue
            with open(full, encoding="utf-8") as f:
                if not re.search(rf"^def {re.escape(name)}\(", f.read(), re.M):
                    problems.append(f"{command}: no 'def {name}(' in {path}")
    assert not problems, "\n".join(problems)


def test_the_test_extra_holds_the_tools_extra():
    """The README's quick start installs ".[tools]", CI ".[test]": every package of the former is in the latter."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO_ROOT, "setup.cfg"))
    extras = {k: {line.strip() for line in v.splitlines() if line.strip()} for k, v in cfg["options.extras_require"].items()}
    for command in doc_commands():
        for extra in re.findall(r'pip install -e "\.\[(\w+)\]"', command.text):
            assert extra in extras, f"{command}: setup.cfg has no extra {extra!r}"
    assert extras["tools"] <= extras["test"], extras


# --------------------------------------------------------------------------------------------- commands run here
def _nifti(path: str, seed: int, shape=(4, 4, 3)) -> None:
    import nibabel as nib
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.random.default_rng(seed).integers(-1000, 1000, size=shape).astype(np.int16)
    nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0])).to_filename(path)


def make_datalist_layouts(data: str) -> None:
    """Tiny NIfTIs named as in the downloads ``prepare_datalist.py`` expects (see its module docstring)."""
    seed = iter(range(10_000))
    for c in list(range(1, 11)) + list(range(21, 41)):  # the 30 labelled BTCV cases, 2 test cases
        _nifti(f"{data}/btcv/imagesTr/img{c:04d}.nii.gz", next(seed))
        _nifti(f"{data}/btcv/labelsTr/label{c:04d}.nii.gz", next(seed))
    for c in (61, 62):
        _nifti(f"{data}/btcv/imagesTs/img{c:04d}.nii.gz", next(seed))
    spleen = f"{data}/Task09_Spleen"
    training = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(5)]
    tests = [f"./imagesTs/spleen_{i}.nii.gz" for i in (10, 11)]
    for path in [p for e in training for p in e.values()] + tests:
        _nifti(os.path.join(spleen, path), next(seed))
    with open(f"{spleen}/dataset.json", "w") as f:
        json.dump({"name": "Spleen", "training": training, "test": tests}, f)
    for i in range(5):
        case = f"BraTS20_Training_{i + 1:03d}"
        for s in ("t1", "t1ce", "t2", "flair", "seg"):
            _nifti(f"{data}/BraTS2020/MICCAI_BraTS2020_TrainingData/{case}/{case}_{s}.nii.gz", next(seed))
    for name in ("a_0", "a_1", "a_2"):
        _nifti(f"{data}/ct_a/{name}.nii.gz", next(seed))
    _nifti(f"{data}/ct_a/labels/a_0.nii.gz", next(seed))  # a label folder: left out of the pool
    for name in ("b_0", "b_1"):
        _nifti(f"{data}/ct_b/{name}.nii.gz", next(seed))
    # a BTCV validation scan copied into the pool under another name: --exclude must catch it
    shutil.copyfile(f"{data}/btcv/imagesTr/img0035.nii.gz", f"{data}/ct_a/copy_of_btcv_0035.nii.gz")


def test_datalist_commands_run_as_written(tmp_path):
    data = str(tmp_path / "data")
    make_datalist_layouts(data)
    workspace = make_workspace(str(tmp_path / "work"))
    run_documented("datalist", workspace, data)
    with open(f"{data}/BraTS2020/datalist.json") as f:
        image = json.load(f)["training"][0]["image"]
    assert [p.rsplit("_", 1)[1] for p in image] == ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    with open(f"{data}/datalist.json") as f:  # the last pool command's (with --exclude)
        pool = json.load(f)
    pooled = [e["image"] for k in ("training", "validation") for e in pool[k]]
    assert sorted(pooled) == [f"ct_a/a_{i}.nii.gz" for i in range(3)]


def test_rtstruct_command_runs_as_written(tmp_path):
    import nibabel as nib
    import numpy as np
    from test_rtstruct import GTV_COUNT, make_ct_series, make_rtstruct, standard_rois

    data = str(tmp_path / "data")
    series = make_ct_series(f"{data}/pat1/CT")
    make_rtstruct(f"{data}/pat1/RS.dcm", series, standard_rois(series))  # holds "GTV-1"
    workspace = make_workspace(str(tmp_path / "work"))
    run_documented("rtstruct", workspace, data)
    label = np.asarray(nib.load(os.path.join(workspace, "pat1_gtv.nii.gz")).dataobj)
    assert int((label > 0).sum()) == GTV_COUNT
    assert nib.load(os.path.join(workspace, "pat1_ct.nii.gz")).shape == label.shape


@pytest.mark.slow  # 4 x ~5 s of CPU importing torch and MONAI
def test_documented_entry_points_answer_help():
    """``<program> --help`` of the commands mapped with ``help=True`` (too long to run here): each exists and parses.
    Started together: each spends its seconds importing torch and MONAI."""
    programs = []
    for command in doc_commands():
        _, _, action = coverage_of(command)
        if isinstance(action, CoveredBy) and action.help:
            argv = argv_of(command, "/nonexistent", REPO_ROOT)
            program = argv[:3] if argv[1] == "-m" else argv[:2]
            if program not in programs:
                programs.append(program)
    assert programs
    procs = [(p, subprocess.Popen([*p, "--help"], cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)) for p in programs]
    for program, proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 and "usage" in out.lower(), f"{shlex.join(program)} --help:\n{out[-3000:]}"


@pytest.mark.slow
def test_bundle_commands_run_as_written(tmp_path):
    """README 2, 3, "Share a trained bundle" and docs/sharing.md, in order: pretrain the UNet bundle on a synthetic
    pool, finetune the BTCV bundle from it (default pretrained_path: the sibling bundle's model.pt) and from scratch,
    evaluate, infer; pack the trained BTCV finetune, download it with MONAI's CLI and run its inference.json with no
    width override; pack the pretraining bundle, download it, finetune the spleen bundle from the download."""
    from tools.data.make_demo_data import make_ct_dataset, make_unlabeled_ct_pool

    data = str(tmp_path / "data")
    for datalist in (make_unlabeled_ct_pool(data, n_train=2, n_val=1, n_test=1),
                     make_ct_dataset(f"{data}/btcv", num_classes=14),
                     make_ct_dataset(f"{data}/Task09_Spleen", num_classes=2)):
        shutil.copyfile(datalist, os.path.join(os.path.dirname(datalist), "datalist.json"))  # the bundles' default
    workspace = make_workspace(str(tmp_path / "work"), ["hybridmim_unet_pretrain", "hybridmim_unet_btcv",
                                                        "hybridmim_unet_msd_spleen"])
    ran = run_documented("bundles", workspace, data)
    assert len(ran) == 11, [str(c) for c in ran]
    assert not os.path.exists(os.path.join(REPO_ROOT, "bundles", "hybridmim_unet_pretrain", "models", "model.pt"))
