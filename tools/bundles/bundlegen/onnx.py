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
"""
from __future__ import annotations

from tools.bundles.bundlegen.common import trained_settings_check

__all__ = ["EXPORTABLE", "export_command", "inference_onnx_config", "onnx_files", "readme_section"]

#: Backbones whose network ``torch.onnx.export`` (dynamo) exports and onnxruntime runs: both (checked by
#: tests/test_onnx_export.py for every finetuning bundle).
EXPORTABLE = ("swin", "unet")

ONNX_FILE = "model.onnx"
CONVERTER_KWARGS = ("{'input_names': ['image'], 'output_names': ['pred'], "
                    "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}")


def export_command(in_channels: int, roi: int, cfg: str = "configs") -> str:
    """The ``onnx_export`` command line (bash, continued lines) for a bundle folder."""
    return (
        "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt \\\n"
        f"    --meta_file {cfg}/metadata.json --config_file {cfg}/inference.json \\\n"
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
        "device": "$torch.device('cpu')",
        "amp": False,
        "network": {
            "_target_": "hybridmim_components.workflow.OnnxNetwork",
            "path": "@onnx_path",
            "intra_op_num_threads": "@onnx_threads",
            "graph_optimization": "@onnx_graph_optimization",
        },
        # the weights are in the .onnx file: no checkpoint loader; the graph fixes the architecture, the
        # preprocessing is checked against the record (models/model.provenance.json, the sidecar of both files)
        "initialize": [f"$monai.utils.set_determinism(seed={seed})",
                       trained_settings_check("@onnx_path", architecture=None)],
    }


def onnx_files(backbone: str, seed: int) -> dict:
    """``{relative_path: content}`` that the ONNX support adds to a finetuning bundle."""
    return {"configs/inference_onnx.json": inference_onnx_config(seed)} if backbone in EXPORTABLE else {}


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

"""
