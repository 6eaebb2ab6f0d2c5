"""Write the twelve HybridMIM bundles under ``bundles/`` from ``tools/bundles/bundlegen``, or check that they match.

    python tools/bundles/generate_bundles.py            # (re)write bundles/
    python tools/bundles/generate_bundles.py --check    # exit 1 and list the files that differ

The bundles on disk stay self-contained (users copy one folder); this generator keeps the twelve consistent.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tools.bundles.bundlegen.common import common_files  # noqa: E402
from hybridmim_components.utils.atomic_files import atomic_open  # noqa: E402

FAMILIES = ("tools.bundles.bundlegen.pretrain", "tools.bundles.bundlegen.finetune")


def render(content) -> str:
    """File text for a generated entry: JSON (indent 4, trailing newline) for dicts/lists, else the string."""
    if isinstance(content, (dict, list)):
        return json.dumps(content, indent=4) + "\n"
    return content


def all_bundles() -> dict[str, dict[str, str]]:
    """``{bundle_name: {relative_path: text}}`` for every family that exists."""
    bundles: dict[str, dict[str, str]] = {}
    for module_name in FAMILIES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        for name, files in module.bundles().items():
            merged = {**common_files(), **files}
            bundles[name] = {path: render(content) for path, content in merged.items()}
    return bundles


def differences(bundles_dir: str) -> list[str]:
    """Paths (relative to ``bundles_dir``) whose content on disk differs from the generator's."""
    diffs = []
    for name, files in all_bundles().items():
        for rel, text in files.items():
            path = os.path.join(bundles_dir, name, rel)
            if not os.path.isfile(path):
                diffs.append(f"{name}/{rel} (missing)")
                continue
            with open(path, encoding="utf-8") as f:
                if f.read() != text:
                    diffs.append(f"{name}/{rel} (differs)")
    return diffs


def write(bundles_dir: str) -> None:
    for name, files in all_bundles().items():
        for rel, text in files.items():
            path = os.path.join(bundles_dir, name, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with atomic_open(path, "w", encoding="utf-8") as f:
                f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    parser.add_argument("--bundles-dir", default=os.path.join(REPO_ROOT, "bundles"))
    args = parser.parse_args(argv)
    if args.check:
        diffs = differences(args.bundles_dir)
        for d in diffs:
            print(d)
        if diffs:
            print("bundles/ is out of date: run python tools/bundles/generate_bundles.py", file=sys.stderr)
        return 1 if diffs else 0
    write(args.bundles_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
