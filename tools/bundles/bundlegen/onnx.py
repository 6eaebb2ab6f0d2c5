"""ONNX for CPU inference in the finetuning bundles: ``configs/inference_onnx.json`` and its README section.

``inference_onnx.json`` is merged over ``inference.json`` (``--config_file "['configs/inference.json',
'configs/inference_onnx.json']"``), so the data, preprocessing, sliding-window inferer and postprocessing are the
ones of ``inference.json`` by construction; it replaces only the network (an onnxruntime session,
``hybridmim_components.workflow.OnnxNetwork``), the device (CPU), mixed precision (off: the exported graph is
float32) and ``initialize`` (no PyTorch checkpoint to load).

The network is exported by MONAI's own ``python -m monai.bundle onnx_export`` with a dynamic batch axis: the
sliding-window inferer hands the network ``sw_batch_size`` patches at a time and fewer in the last batch of a volume.
The patch size (``roi_size``) and the channels are fixed in the export. The dummy input has batch 2 because
``torch.export`` (the exporter of torch >= 2.9) treats a size-1 dimension as a constant, not as a dynamic one.
``--use_trace True`` hands the module itself to ``torch.onnx.export`` on every MONAI: without it MONAI 1.5 first
scripts the network, and torch's exporter (``torch.export``) refuses a ScriptModule.
"""
from __future__ import annotations

from tools.bundles.bundlegen.common import trained_settings_check

__all__ = ["EXPORTABLE", "CPU_FAST", "CONVERTER_KWARGS", "USE_TRACE", "export_command", "inference_onnx_config",
           "inference_cpu_fast_config", "onnx_files", "readme_section"]

#: Backbones whose network ``torch.onnx.export`` (dynamo) exports and onnxruntime runs: both (checked by
#: tests/test_onnx_export.py for every finetuning bundle).
EXPORTABLE = ("swin", "unet")

ONNX_FILE = "model.onnx"
CONVERTER_KWARGS = ("{'input_names': ['image'], 'output_names': ['pred'], "
                    "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}")
#: not scripted first (MONAI 1.5 scripts unless told to trace; torch.export refuses a ScriptModule)
USE_TRACE = ("--use_trace", "True")


def export_command(in_channels: int, roi: int, cfg: str = "configs") -> str:
    """The ``onnx_export`` command line (bash, continued lines) for a bundle folder."""
    return (
        "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\\n"
        f"    --meta_file {cfg}/metadata.json --config_file {cfg}/inference.json {' '.join(USE_TRACE)} \\\n"
        f"    --input_shape \"[2, {in_channels}, {roi}, {roi}, {roi}]\" \\\n"
        f"    --converter_kwargs \"{CONVERTER_KWARGS}\""
    )


def inference_onnx_config(seed: int) -> dict:
    """The keys that ``inference_onnx.json`` overrides in ``inference.json``."""
    return {
        # written by onnx_export (see the bundle README); roi_size and input channels are those of the export
        "onnx_path": f"$@ckpt_dir + '/{ONNX_FILE}'",
        # onnxruntime threads per operator (0: one per physical core) and graph optimisation level
        "onnx_threads": 0,
        "onnx_graph_optimization": "all",
        # "none": the float32 graph as exported; "int8" / "int8_linear": onnxruntime's dynamic int8 quantization of
        # convolutions and linear layers / of linear layers only (a copy made at the first load, cached beside
        # onnx_path); changes the logits slightly: docs/cpu_inference.md measures the label maps' agreement
        "onnx_quantization": "none",
        "device": "$torch.device('cpu')",
        "amp": False,
        "network": {
            "_target_": "hybridmim_components.workflow.OnnxNetwork",
            "path": "@onnx_path",
            "intra_op_num_threads": "@onnx_threads",
            "graph_optimization": "@onnx_graph_optimization",
            "quantization": "@onnx_quantization",
        },
        # the weights are in the .onnx file: no checkpoint loader; the graph fixes the architecture, the
        # preprocessing is checked against the record (models/model.provenance.json, the sidecar of both files)
        "initialize": [f"$monai.utils.set_determinism(seed={seed})",
                       trained_settings_check("@onnx_path", architecture=None)],
    }


#: The settings of ``inference_cpu_fast.json`` per backbone, chosen by whole-CT measurements on a 2-core CPU
#: (tools/benchmarks/benchmark_whole_ct.py, docs/cpu_inference.md): sliding-window overlap, patches per network call
#: and onnxruntime's quantization.
CPU_FAST = {
    "unet": {"overlap": 0.25, "sw_batch_size": 1, "quantization": "none"},
    "swin": {"overlap": 0.25, "sw_batch_size": 1, "quantization": "none"},
}


def inference_cpu_fast_config(backbone: str) -> dict:
    """The keys of ``inference_cpu_fast.json``, merged over ``inference.json`` + ``inference_onnx.json``.

    Each key may change the label map against the float32 default pipeline (measured in docs/cpu_inference.md),
    which is why they are a separate layer and not the defaults: ``sw_overlap`` (0.5 in ``inference.json``: 24
    windows instead of 60 on an abdominal CT at 0.25), ``sw_batch_size`` (onnxruntime runs one patch per call anyway:
    ``OnnxNetwork.max_batch``) and ``onnx_quantization``. (Taking the argmax before inverting the preprocessing was
    measured too: no time saved on a whole CT, labels changed; not in the layer.)
    """
    fast = CPU_FAST[backbone]
    return {
        "sw_overlap": fast["overlap"],
        "sw_batch_size": fast["sw_batch_size"],
        "onnx_quantization": fast["quantization"],
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": "@sw_batch_size",
                    "overlap": "@sw_overlap"},
    }


def onnx_files(backbone: str, seed: int) -> dict:
    """``{relative_path: content}`` that the ONNX support adds to a finetuning bundle."""
    if backbone not in EXPORTABLE:
        return {}
    return {"configs/inference_onnx.json": inference_onnx_config(seed),
            "configs/inference_cpu_fast.json": inference_cpu_fast_config(backbone)}


def readme_section(backbone: str, in_channels: int, roi: int, cfg: str = "configs") -> str:
    """The bundle README's ``### CPU inference with ONNX`` section (ends with a blank line)."""
    if backbone not in EXPORTABLE:
        return ""
    run = "python -m monai.bundle run"
    return f"""### CPU inference with ONNX

Export the trained `models/model.pt` to `models/model.onnx` (needs `onnx`, `onnxscript` and `onnxruntime`:
`pip install hybridmim-components[onnx]`). The batch axis stays dynamic (the sliding window's last batch may hold
fewer than `sw_batch_size` patches); the patch size is fixed to `roi_size` {roi}^3 and {in_channels} input
channel(s), so export again after changing `roi_size`:

```bash
{export_command(in_channels, roi, cfg)}
```

Then run the inference pipeline of `inference.json` (same preprocessing, sliding window, postprocessing, outputs)
with onnxruntime on the CPU; `inference_onnx.json` only replaces the network, the device and the checkpoint loading
(`--onnx_path`, `--onnx_threads` and `--onnx_graph_optimization` set the file, the threads and onnxruntime's graph
optimisation):

```bash
{run} --config_file "['{cfg}/inference.json','{cfg}/inference_onnx.json']"
```

For a whole CT on a few CPU cores, `inference_cpu_fast.json` layered on top trades agreement for time
(sliding-window overlap {CPU_FAST[backbone]['overlap']}, {CPU_FAST[backbone]['sw_batch_size']} patch per call, onnxruntime quantization
`{CPU_FAST[backbone]['quantization']}`; an int8 mode runs a copy of `model.onnx` made at the first run, cached beside
it), each a config key (`--sw_overlap`, `--sw_batch_size`, `--onnx_quantization`). Times and the agreement with the float32 label maps: `docs/cpu_inference.md` of the
project.

```bash
{run} --config_file "['{cfg}/inference.json','{cfg}/inference_onnx.json','{cfg}/inference_cpu_fast.json']"
```

"""
