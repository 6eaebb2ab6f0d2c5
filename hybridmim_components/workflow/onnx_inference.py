"""An exported ONNX network as the ``network`` of a bundle's inference pipeline, run by onnxruntime on the CPU.

``configs/inference_onnx.json`` (merged over ``inference.json``) replaces the PyTorch network with
:class:`OnnxNetwork`; everything else (preprocessing, ``SlidingWindowInferer``, postprocessing, saving) is the
same config. The sliding-window inferer calls the network with batches of ``sw_batch_size`` patches of ``roi_size``;
the last batch of a volume may be smaller, so the bundles export the network with a dynamic batch axis (the command
is in each bundle's README and :data:`EXPORT_HINT`).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import torch

__all__ = ["OnnxNetwork", "EXPORT_HINT", "QUANTIZATION_MODES", "quantized_onnx", "stable_instance_norm"]

logger = logging.getLogger(__name__)

#: ``quantization`` values of :class:`OnnxNetwork` -> the operator types that onnxruntime's dynamic quantization turns
#: into int8 (``None``: the float32 graph as exported).
QUANTIZATION_MODES = {
    "none": None,
    "int8": ("Conv", "MatMul", "Gemm"),  # convolutions and linear layers
    "int8_linear": ("MatMul", "Gemm"),  # linear layers only (SwinUNETR's attention and MLPs); convolutions float32
}

#: How a bundle makes ``models/model.onnx`` from ``models/model.pt`` (shown when the file is missing).
EXPORT_HINT = (
    "python -m monai.bundle onnx_export network_def --filepath models/model.onnx --ckpt_file models/model.pt "
    "--meta_file configs/metadata.json --config_file configs/inference.json --input_shape \"[2, C, D, H, W]\" "
    "--converter_kwargs \"{'input_names': ['image'], 'output_names': ['pred'], "
    "'dynamic_axes': {'image': {0: 'batch'}, 'pred': {0: 'batch'}}}\" (C input channels, D H W the roi_size; "
    "the bundle README has the exact command)"
)


def stable_instance_norm(model, spatial_dims: int = 3):
    """``model`` (an ``onnx.ModelProto``) with every ``InstanceNormalization`` node replaced by an accurate form.

    Why: onnxruntime's CPU ``InstanceNormalization`` (and a plain ``ReduceMean`` over all voxels) sums a whole
    channel in float32 in one pass and takes the variance as E[x^2] - E[x]^2, so a channel whose mean is large against
    its spread, as in the wide uniform regions of a CT patch (air, padding), loses most digits: measured 8e-3 logit
    errors for BasicUNet on the demo CT, where PyTorch float32 is within 1e-5 of float64. The replacement reduces one
    spatial axis at a time (means of at most one side's voxels, then means of those: the same mean, since every
    row has as many voxels) and subtracts the mean before squaring (``d = x - mean(x)``, ``var = mean(d^2)``), as
    PyTorch does, with the node's epsilon, scale and bias. Inputs ``B x C x spatial``; the rewritten node keeps its
    output name. Returns the same (modified) ``model``.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    last_first = list(range(1 + spatial_dims, 1, -1))  # e.g. 4, 3, 2
    shape_axes = [0] + list(range(2, 2 + spatial_dims))  # scale/bias [C] -> [1, C, 1, 1, 1]
    graph.initializer.extend([numpy_helper.from_array(np.array([a], np.int64), f"_sin_axis{a}") for a in last_first])
    graph.initializer.append(numpy_helper.from_array(np.array(shape_axes, np.int64), "_sin_unsq"))

    def mean(inp: str, out: str, prefix: str) -> list:
        """Mean over the spatial axes, one axis at a time (keepdims)."""
        nodes, cur = [], inp
        for a in last_first:
            nxt = out if a == last_first[-1] else f"{prefix}{a}"
            if opset >= 18:  # axes became an input in opset 18
                nodes.append(helper.make_node("ReduceMean", [cur, f"_sin_axis{a}"], [nxt], keepdims=1, name=nxt + "_op"))
            else:
                nodes.append(helper.make_node("ReduceMean", [cur], [nxt], axes=[a], keepdims=1, name=nxt + "_op"))
            cur = nxt
        return nodes

    def unsqueeze(inp: str, out: str):
        if opset >= 13:
            return helper.make_node("Unsqueeze", [inp, "_sin_unsq"], [out], name=out + "_op")
        return helper.make_node("Unsqueeze", [inp], [out], axes=shape_axes, name=out + "_op")

    nodes = []
    for i, node in enumerate(graph.node):
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        x, scale, bias = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"_sin{i}_"
        graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), p + "eps"))
        nodes += mean(x, p + "mean", p + "mean_ax")
        nodes.append(helper.make_node("Sub", [x, p + "mean"], [p + "d"], name=p + "sub"))
        nodes.append(helper.make_node("Mul", [p + "d", p + "d"], [p + "d2"], name=p + "sq"))
        nodes += mean(p + "d2", p + "var", p + "var_ax")
        nodes += [
            helper.make_node("Add", [p + "var", p + "eps"], [p + "var_eps"], name=p + "add_eps"),
            helper.make_node("Sqrt", [p + "var_eps"], [p + "std"], name=p + "sqrt"),
            helper.make_node("Div", [p + "d", p + "std"], [p + "norm"], name=p + "div"),
            unsqueeze(scale, p + "scale"),
            unsqueeze(bias, p + "bias"),
            helper.make_node("Mul", [p + "norm", p + "scale"], [p + "scaled"], name=p + "mul_scale"),
            helper.make_node("Add", [p + "scaled", p + "bias"], list(node.output), name=p + "add_bias"),
        ]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def quantized_onnx(path: str, mode: str = "int8") -> str:
    """The int8 dynamically quantized copy of the ONNX model at ``path``, made once and cached beside it.

    Dynamic quantization (``onnxruntime.quantization.quantize_dynamic``): the weights of the operators of
    :data:`QUANTIZATION_MODES` ``[mode]`` are stored as signed int8 (one scale per tensor); their inputs are quantized
    to uint8 at run time from each call's own range, the products accumulated in int32 and the outputs dequantized to
    float32. Everything else (instance/layer norms, softmax, activations) stays float32. It changes the logits (about
    1e-2 relative), so it is an option of the bundles (``onnx_quantization``), never a default; the agreement of the
    label maps with float32 is measured in ``docs/cpu_inference.md``.

    The copy is named ``<stem>.<mode>-<first 12 hex digits of the source's SHA-256>.onnx``: a re-exported model gets
    a new copy instead of a stale one; it is written through :func:`atomic_path`, so a reader never sees half of it
    and two processes racing write the same bytes.

    Args:
        path: the float32 ``.onnx`` file (``models/model.onnx``).
        mode: a key of :data:`QUANTIZATION_MODES` other than ``"none"``.

    Returns:
        The path of the quantized model (``path`` itself for ``"none"``).

    Raises:
        ValueError: an unknown ``mode``.
        FileNotFoundError: ``path`` does not exist.
    """
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"onnx quantization must be one of {sorted(QUANTIZATION_MODES)}, got {mode!r}.")
    path = os.fspath(path)
    if QUANTIZATION_MODES[mode] is None:
        return path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model {path!r} not found: {EXPORT_HINT}.")
    import hashlib

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from hybridmim_components.utils.atomic_files import atomic_path

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    stem = os.path.splitext(path)[0]
    target = f"{stem}.{mode}-{digest.hexdigest()[:12]}.onnx"
    if not os.path.isfile(target):
        with atomic_path(target) as tmp:
            quantize_dynamic(path, tmp, op_types_to_quantize=list(QUANTIZATION_MODES[mode]),
                             weight_type=QuantType.QInt8)
    return target


class OnnxNetwork(torch.nn.Module):
    """An onnxruntime session (CPU execution provider) called like the PyTorch network it was exported from.

    A ``torch.nn.Module`` without parameters, so that MONAI's engines can switch it to ``eval()``, move it with
    ``.to()`` and hand it to an inferer unchanged.

    Args:
        path: the ``.onnx`` file (written by ``python -m monai.bundle onnx_export``).
        intra_op_num_threads: threads of one operator; 0 lets onnxruntime choose (one per physical core).
        graph_optimization: ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disabled"``: onnxruntime's graph
            optimisation level.
        max_batch: patches per onnxruntime call (larger batches are split and the logits concatenated). 1 by
            default: on the CPU one patch at a time was faster per patch than 4 (SwinUNETR, 96^3: 3.9 s vs 5.9 s)
            and needs a fraction of the memory (onnxruntime keeps the largest intermediates of a call alive:
            10 GB for 4 SwinUNETR patches at feature size 12, 2.9 GB for one).
        stable_norm: run instance norms in the two-pass form of :func:`stable_instance_norm` (default; false keeps
            onnxruntime's own kernel, faster but off by up to 1e-2 on CT patches with large uniform regions).
        quantization: ``"none"`` (default: the float32 graph), ``"int8"`` or ``"int8_linear"``: run the int8
            dynamically quantized copy of :func:`quantized_onnx` (made at the first load, cached beside ``path``).
        inter_op_num_threads: threads running independent operators in parallel; 0 lets onnxruntime choose.

    Call: ``x`` float tensor ``B x C x D x H x W`` (any device; ``B`` free, ``C D H W`` those exported) ->
    logits ``B x K x D x H x W`` float32 on ``x``'s device.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it and the export command).
        ImportError: onnxruntime is not installed.
        ValueError: an unknown ``graph_optimization``; at call time, an input whose rank or fixed sizes do not
            match the exported model's.
    """

    _LEVELS = ("disabled", "basic", "extended", "all")

    def __init__(self, path: str, intra_op_num_threads: int = 0, graph_optimization: str = "all",
                 max_batch: int = 1, stable_norm: bool = True, quantization: str = "none",
                 inter_op_num_threads: int = 0):
        super().__init__()
        path = os.fspath(path)
        # what __deepcopy__ needs to open the same session again
        self._init_kwargs = dict(path=path, intra_op_num_threads=intra_op_num_threads,
                                 graph_optimization=graph_optimization, max_batch=max_batch, stable_norm=stable_norm,
                                 quantization=quantization, inter_op_num_threads=inter_op_num_threads)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"ONNX model {path!r} not found: export it from the trained checkpoint first, from the bundle "
                f"folder: {EXPORT_HINT}."
            )
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch!r}.")
        if graph_optimization not in self._LEVELS:
            raise ValueError(f"graph_optimization must be one of {self._LEVELS}, got {graph_optimization!r}.")
        if quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {sorted(QUANTIZATION_MODES)}, got {quantization!r}.")
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as err:  # optional dependencies: pip install hybridmim-components[onnx]
            raise ImportError(
                f"running {path!r} needs onnx and onnxruntime: pip install hybridmim-components[onnx]."
            ) from err
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(intra_op_num_threads)
        options.inter_op_num_threads = int(inter_op_num_threads)
        options.graph_optimization_level = {
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        self.path = path
        self.max_batch = int(max_batch)
        self.stable_norm = bool(stable_norm)
        self.quantization = quantization
        self.model_path = quantized_onnx(path, quantization)  # the file the session runs
        source = self.model_path
        if self.stable_norm:
            source = stable_instance_norm(onnx.load(source)).SerializeToString()
        self.session = ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        # fixed sizes are ints, dynamic ones names (e.g. "batch")
        self.input_shape = tuple(inp.shape)

    def _check(self, shape: tuple) -> None:
        expected = self.input_shape
        fixed_ok = all(not isinstance(e, int) or e == s for e, s in zip(expected, shape))
        if len(shape) != len(expected) or not fixed_ok:
            wanted = "x".join(str(e) if isinstance(e, int) else "*" for e in expected)
            raise ValueError(
                f"{self.path!r} was exported for inputs {wanted} (B x C x D x H x W), got {'x'.join(map(str, shape))}:"
                " the bundle's roi_size and input channels must be those of the export (export again after "
                "changing them)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``B x C x D x H x W`` -> logits ``B x K x D x H x W`` (float32, on ``x``'s device)."""
        self._check(tuple(x.shape))
        # a plain float32 array (MetaTensor's metadata is not needed by the network)
        plain = x.as_tensor() if hasattr(x, "as_tensor") else x
        array = np.ascontiguousarray(plain.detach().to("cpu", torch.float32).numpy())
        chunks = [self.session.run(None, {self.input_name: array[i:i + self.max_batch]})[0]
                  for i in range(0, array.shape[0], self.max_batch)]
        logits = chunks[0] if len(chunks) == 1 else np.concatenate(chunks, axis=0)
        return torch.from_numpy(logits).to(x.device)

    def __deepcopy__(self, memo: dict) -> "OnnxNetwork":
        """A new session on the same file with the same options (an onnxruntime session cannot be copied; MONAI
        Label deep-copies its ``network_def`` for each device)."""
        return type(self)(**self._init_kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The graph holds its weights: a PyTorch state dict is not loaded. MONAI Label loads ``models/model.pt`` into
        whatever ``network_def`` is, with ``strict=False``: that is logged, naming the file whose weights run. With
        ``strict=True`` a non-empty state dict is an error (the caller expects those weights to be used)."""
        if state_dict and strict:
            raise RuntimeError(f"OnnxNetwork({self.path!r}) cannot load a state dict of {len(state_dict)} tensors: "
                               "its weights are those of the ONNX graph (export it again from the checkpoint)")
        if state_dict:
            logger.info("OnnxNetwork: the %d tensors given to load_state_dict are not loaded; the weights of %s run",
                        len(state_dict), self.model_path)
        return torch.nn.modules.module._IncompatibleKeys([], list(state_dict))
