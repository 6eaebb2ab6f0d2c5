"""Make the MONAI 1.4 SwinUNETR reference that ``tests/test_merging.py`` checks ``LegacyPatchMerging`` against.

MONAI 1.5 changed the 2×2×2 concatenation order of SwinUNETR's default ``PatchMerging`` (see
``hybridmim_components/weights/merging.py``). This script runs under MONAI 1.4, builds a small SwinUNETR
(``NET_ARGS``, eval mode), gives it fixed weights, runs it on a fixed input and saves

- ``input`` [1, 1, 64, 32, 32] (float16, holding the float32 input exactly) and ``output`` [1, 2, 64, 32, 32]
  (float32),
- ``sha256``: {state-dict key: sha256 of dtype, shape and bytes} of the weights it ran with,
- ``seed``, ``monai_version``, ``torch_version``

to ``tests/data/swin_merging_reference_monai14.pt`` (about 0.65 MB; load with ``weights_only=True``).

Why hashes and not the state dict: the smallest SwinUNETR (feature_size 12) has 4.1 M parameters (16 MB). The
weights are instead a pure function of (key, shape, ``seed``) (:func:`seeded_state_dict`: integers from
``torch.randint`` with a per-key generator, scaled exactly, no transcendental functions, so the bits are the same
on every CPU); the test rebuilds them under the current MONAI and first checks every hash, so it runs with exactly
the weights MONAI 1.4 ran with. The input, 64×32×32, is about the smallest SwinUNETR takes: the bottleneck's
instance norm needs more than one voxel (2×1×1 here), and all four merging layers see whole 2×2×2 neighbourhoods
(32×16×16 -> 16×8×8 -> 8×4×4 -> 4×2×2 -> 2×1×1 tokens); a 64³ output alone would be 2 MB.

Made with (from the repository root; the side environment is gitignored)::

    python3 -m venv .venv-monai14
    .venv-monai14/bin/pip install torch==2.13.0
    .venv-monai14/bin/pip install monai==1.4.0 einops==0.8.2   # numpy 1.26.4 comes with monai
    .venv-monai14/bin/python tools/weights/make_merging_reference.py

It refuses to run under another MONAI than 1.4 (the reference would not be one). The helpers here are imported
by the test under the current MONAI.
"""
from __future__ import annotations

import hashlib
import math
import os
import zlib

import torch
from hybridmim_components.utils.atomic_files import atomic_open

REFERENCE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "tests",
    "data",
    "swin_merging_reference_monai14.pt",
)
SEED = 1234
NET_ARGS = dict(in_channels=1, out_channels=2, feature_size=12)
INPUT_SHAPE = (1, 1, 64, 32, 32)  # [B, C, D, H, W]
_LEVELS = 128  # weights take 2·_LEVELS values, uniform in [-√3·std, √3·std)


def _uniform(shape: tuple[int, ...], key: str, seed: int, std: float, mean: float = 0.0) -> torch.Tensor:
    """Float32 [shape] with mean ``mean`` and std ≈ ``std``, bit-identical on any CPU for the same torch RNG."""
    gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
    ints = torch.randint(-_LEVELS, _LEVELS, shape, generator=gen, dtype=torch.int64)
    step = std * math.sqrt(3.0) / _LEVELS  # uniform on ±√3·std has std `std`
    return ((ints.to(torch.float64) + 0.5) * step + mean).to(torch.float32)


def seeded_state_dict(template: dict[str, torch.Tensor], seed: int = SEED) -> dict[str, torch.Tensor]:
    """Fixed weights for every floating tensor of ``template`` (a SwinUNETR state dict); others are copied.

    Scale by role, so activations stay O(1): matrices and kernels 1/√fan_in, relative position bias tables 0.1,
    1-D ``*.weight`` (norm scales) 1 ± 0.1, biases ±0.05. ``relative_position_index`` (int) is the model's own.
    """
    out = {}
    for key, t in template.items():
        shape = tuple(t.shape)
        if not t.is_floating_point():
            out[key] = t.clone()
        elif key.endswith("relative_position_bias_table"):
            out[key] = _uniform(shape, key, seed, 0.1)
        elif t.dim() >= 2:
            out[key] = _uniform(shape, key, seed, 1.0 / math.sqrt(t.numel() // shape[0]))
        elif key.endswith(".weight"):
            out[key] = _uniform(shape, key, seed, 0.1, mean=1.0)
        else:
            out[key] = _uniform(shape, key, seed, 0.05)
    return out


def fingerprints(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """{key: sha256 of dtype, shape and raw bytes} — equal exactly when the tensors are."""
    out = {}
    for key, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
        out[key] = h.hexdigest()
    return out


def seeded_input(seed: int = SEED) -> torch.Tensor:
    """[1, 1, 64, 32, 32] float32, uniform on [-2, 2) in steps of 1/64, so float16 holds it exactly."""
    gen = torch.Generator().manual_seed(seed + zlib.crc32(b"input"))
    return ((torch.randint(-_LEVELS, _LEVELS, INPUT_SHAPE, generator=gen) + 0.5) / 64).to(torch.float32)


def main() -> None:
    import monai
    from monai.networks.nets import SwinUNETR

    if not monai.__version__.startswith("1.4."):
        raise SystemExit(f"make_merging_reference.py needs MONAI 1.4 (the old merging order), found {monai.__version__}")
    # img_size is required (and only checked) in MONAI 1.4
    net = SwinUNETR(img_size=INPUT_SHAPE[2:], **NET_ARGS).eval()
    weights = seeded_state_dict(net.state_dict())
    net.load_state_dict(weights, strict=True)
    x = seeded_input()
    with torch.no_grad():
        y = net(x)  # [1, 2, 64, 32, 32]
    os.makedirs(os.path.dirname(REFERENCE_PATH), exist_ok=True)
    with atomic_open(REFERENCE_PATH, "wb") as f:
        torch.save(
            {
                "input": x.half(),  # exact (see seeded_input); halves the file
                "output": y,
                "sha256": fingerprints(weights),
                "seed": SEED,
                "monai_version": str(monai.__version__),
                "torch_version": str(torch.__version__),  # a TorchVersion would not load with weights_only
            },
            f,
        )
    torch.load(REFERENCE_PATH, weights_only=True)  # what the test does
    print(
        f"wrote {REFERENCE_PATH} ({os.path.getsize(REFERENCE_PATH) / 1e6:.2f} MB): MONAI {monai.__version__}, "
        f"torch {torch.__version__}, {len(weights)} tensors, output std {y.std():.4f}"
    )


if __name__ == "__main__":
    main()
