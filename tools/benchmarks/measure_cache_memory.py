"""Host memory of one cached volume of the pretraining bundles (the figure quoted in their README's Memory section).

Writes a synthetic CT of ``shape`` voxels at ``spacing`` mm (``tools/data/make_demo_data.py``: air, body, organs), runs a
pretraining bundle's cached transforms (``train#deterministic_transforms``: load, RAS, resample to 1.5 × 1.5 × 2.0 mm,
window, crop to the body, pad) through ``CacheDataset`` and prints the cached tensor's shape and size, the growth of
the process's resident memory, and the size of the resampled grid before the body crop (an upper bound)::

    python tools/benchmarks/measure_cache_memory.py --shape 512,512,200 --spacing 0.8,0.8,2.5
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(shape, spacing, bundle: str = "hybridmim_unet_pretrain") -> dict:
    sys.path.insert(0, REPO_ROOT)
    from monai.bundle import ConfigParser
    from monai.data import CacheDataset
    from monai.transforms import Compose

    from tools.data.make_demo_data import make_unlabeled_ct_pool

    with tempfile.TemporaryDirectory() as tmp:
        datalist = make_unlabeled_ct_pool(tmp, n_train=1, n_val=0, n_test=0, shape=shape, spacing=spacing)
        with open(datalist) as f:
            path = os.path.join(tmp, json.load(f)["training"][0]["image"])
        parser = ConfigParser()
        parser.read_config(os.path.join(REPO_ROOT, "bundles", bundle, "configs", "train.json"))
        transform = Compose(parser.get_parsed_content("train#deterministic_transforms"))
        pixdim = parser.get_parsed_content("pixdim")
        gc.collect()
        before, start = _rss_mb(), time.time()
        dataset = CacheDataset([{"image": path}], transform, cache_rate=1.0, num_workers=0, progress=False)
        gc.collect()
        image = dataset._cache[0]["image"]  # the cached MetaTensor, C×D×H×W float32
        grid = 1
        for n, s, p in zip(shape, spacing, pixdim):
            grid *= round(n * s / p)
        return {
            "input": f"{'x'.join(map(str, shape))} voxels at {'x'.join(map(str, spacing))} mm",
            "cached_shape": list(image.shape),
            "cached_mb": round(image.numel() * image.element_size() / 2**20, 1),
            "rss_growth_mb": round(_rss_mb() - before, 1),
            "resampled_grid_mb": round(grid * 4 / 2**20, 1),
            "seconds": round(time.time() - start, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,200")
    parser.add_argument("--spacing", default="0.8,0.8,2.5")
    parser.add_argument("--bundle", default="hybridmim_unet_pretrain")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    print(json.dumps(measure(shape, spacing, args.bundle), indent=2))


if __name__ == "__main__":
    main()
