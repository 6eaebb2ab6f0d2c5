"""Pack a trained pretraining bundle into a zip that ``python -m monai.bundle download`` accepts.

    python tools/bundles/pack_bundle.py bundles/hybridmim_unet_pretrain --version 0.1.1 \\
        --changelog "pretrained on our CT pool, 100k iterations" --output dist/hybridmim_unet_pretrain_v0.1.1.zip
    python -m monai.bundle download --name hybridmim_unet_pretrain \\
        --url file://$PWD/dist/hybridmim_unet_pretrain_v0.1.1.zip --bundle_dir downloaded
    python -m monai.bundle run --config_file bundles/hybridmim_unet_msd_spleen/configs/train.json \\
        --pretrained_path downloaded/hybridmim_unet_pretrain

The zip holds one folder named after the bundle (``download --name <name> --url ...`` saves ``<name>.zip`` in
``--bundle_dir`` and unpacks it there, so the bundle lands in ``<bundle_dir>/<name>``) with what a user of the weights
needs: ``configs/``, ``docs/``, ``scripts/`` (if any), ``LICENSE``, ``models/model.pt`` (the backbone state dict the
pretraining saved) with ``models/model.provenance.json`` (its preprocessing, backbone and versions; full training
checkpoints, the whole pretraining network and ``eval/`` logs stay behind) and a
``large_files.yml`` in the MONAI model zoo's format listing ``models/model.pt`` with its SHA-256 and a URL: a
placeholder unless ``--url`` gives it. Fill it in when you host the weights separately; then
``python -m monai.bundle download_large_files --bundle_path <bundle>`` fetches and checks them, and the finetune
bundles' weight loader checks the hash whenever it loads the bundle.

``--version`` sets ``version`` in the packed ``configs/metadata.json`` and adds a changelog line (``--changelog``, by
default one naming the weights' hash); the bundle folder itself is not changed (the repository's bundles are
generated). The zip is reproducible: sorted members, fixed timestamps.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence

from hybridmim_components.utils.atomic_files import atomic_path

__all__ = ["pack_bundle", "main", "URL_PLACEHOLDER"]

URL_PLACEHOLDER = "<fill in: a URL where models/model.pt can be downloaded>"
WEIGHTS = "models/model.pt"
# what the weights were trained with (hybridmim_components.weights.provenance)
PROVENANCE = "models/model.provenance.json"
METADATA = "configs/metadata.json"
LARGE_FILES = "large_files.yml"
CONTENT_DIRS = ("configs", "docs", "scripts")  # copied whole (scripts: code a bundle's configs may import)
ROOT_FILES = ("LICENSE",)
SKIPPED_NAMES = ("__pycache__", ".ipynb_checkpoints")
FULL_CHECKPOINT_KEYS = ("optimizer", "lr_scheduler", "trainer")  # what CheckpointSaver adds beside the network
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = _SEMVER.match(str(text))
    return tuple(int(g) for g in m.groups()) if m else None  # type: ignore[return-value]


def _bundle_files(bundle: str) -> tuple[list[str], list[str]]:
    """``(included, left_out)``: bundle-relative POSIX paths of the files to pack and of those that stay behind."""
    included, left_out = [], []
    for dirpath, dirnames, filenames in os.walk(bundle):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_NAMES)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), bundle).replace(os.sep, "/")
            top = rel.split("/", 1)[0]
            keep = (
                (top in CONTENT_DIRS and "/" in rel and not name.startswith(".") and not name.endswith(".pyc"))
                or rel in ROOT_FILES
                or rel in (WEIGHTS, PROVENANCE)
            )
            (included if keep else left_out).append(rel)
    return sorted(included), sorted(left_out)


def _check_weights(path: str) -> None:
    """``models/model.pt`` must be a loadable (``weights_only``) state dict of tensors, not a full checkpoint."""
    import torch

    from hybridmim_components.weights.transfer import extract_state_dict

    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} cannot be loaded with torch.load(weights_only=True): {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(content).__name__}.")
    extra = [k for k in FULL_CHECKPOINT_KEYS if k in content]
    if extra:
        raise ValueError(
            f"{path} looks like a full training checkpoint (keys {extra}: optimizer/trainer state), not the backbone "
            "weights: models/model.pt should be the state dict the pretraining bundle saves as its best model."
        )
    try:
        if not extract_state_dict(content):
            raise ValueError("no tensors")
    except ValueError as e:
        raise ValueError(f"{path} holds no weights: {e}") from e


def _large_files_yml(name: str, digest: str, url: str, record_digest: str | None = None) -> str:
    # json.dumps quotes the strings: a JSON string is a valid YAML double-quoted scalar
    text = (
        f"# Large files of the {name} bundle, in the MONAI model zoo's large_files.yml format.\n"
        "# models/model.pt is packed with the bundle. If you host it separately, set url to where it can be\n"
        "# downloaded; `python -m monai.bundle download_large_files --bundle_path <bundle>` then fetches it and\n"
        "# checks the hash, and hybridmim_components.load_pretrained_weights checks it whenever it loads the bundle.\n"
        "# models/model.provenance.json (what the weights were trained with) is packed too; its hash is checked\n"
        "# whenever a config compares its settings with it (hybridmim_components.check_trained_settings).\n"
        "large_files:\n"
        f"  - path: {json.dumps(WEIGHTS)}\n"
        f"    url: {json.dumps(url)}\n"
        f"    hash_val: {json.dumps(digest)}\n"
        '    hash_type: "sha256"\n'
    )
    if record_digest is not None:
        text += (
            f"  - path: {json.dumps(PROVENANCE)}\n"
            f"    url: {json.dumps(_sibling_url(url, PROVENANCE))}\n"
            f"    hash_val: {json.dumps(record_digest)}\n"
            '    hash_type: "sha256"\n'
        )
    return text


def _sibling_url(url: str, relative: str) -> str:
    """The record's URL beside the weights' one (``.../model.pt`` -> ``.../model.provenance.json``)."""
    if url == URL_PLACEHOLDER or "/" not in url:
        return URL_PLACEHOLDER.replace("models/model.pt", relative)
    return url.rsplit("/", 1)[0] + "/" + os.path.basename(relative)


def _set_config_value(config: dict, config_id: str, value, seen: tuple = ()) -> tuple[str, object] | None:
    """Set ``config_id`` (``a#b`` nested) to ``value`` where the config holds it as a literal; a plain reference
    (``"@in_channels"``) is followed to the key it names. Returns ``(id set, old value)`` when something changed,
    ``None`` when the config does not hold the key, already has the value, or computes it (a ``$`` expression)."""
    parts = config_id.split("#")
    node = config
    for part in parts[:-1]:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    if not isinstance(node, dict) or parts[-1] not in node:
        return None
    old = node[parts[-1]]
    if isinstance(old, str) and old.startswith("@") and old[1:] not in seen:
        return _set_config_value(config, old[1:], value, seen + (config_id,))
    if (isinstance(old, str) and old.startswith(("$", "%"))) or old == value:
        return None
    node[parts[-1]] = value
    return config_id, old


def trained_configs(bundle: str, record: Mapping) -> dict[str, tuple[str, list[str]]]:
    """The bundle's config files with the trained settings of ``record`` written in (width, merging order, channels,
    classes, spacing, window, crop): ``{relative path: (JSON text, ["key: old -> new", ...])}`` for each config that
    changed. Keys a config computes (``$`` expressions) are left as they are."""
    from hybridmim_components.weights.trained_settings import config_values_from_record

    values = config_values_from_record(record)
    changed = {}
    folder = os.path.join(bundle, "configs")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name == "metadata.json":
            continue
        path = os.path.join(folder, name)
        with open(path) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"cannot read {path}: {e}") from e
        notes = []
        for key, value in values.items():
            result = _set_config_value(config, key, value)
            if result is not None:
                notes.append(f"{result[0]}: {result[1]!r} -> {value!r}")
        if notes:
            changed[f"configs/{name}"] = (json.dumps(config, indent=4) + "\n", notes)
    return changed


def _packed_record(record: Mapping, weights_digest: str) -> str:
    """The record as packed: it names the SHA-256 of the weights it describes (a record beside other weights is
    refused by ``check_trained_settings``)."""
    from hybridmim_components.weights.provenance import provenance_text

    return provenance_text({**record, "weights_sha256": weights_digest})


def _existing_url(bundle: str) -> str | None:
    """The url a bundle's own ``large_files.yml`` already gives ``models/model.pt`` (re-packing a downloaded one)."""
    from monai.bundle import ConfigParser

    path = os.path.join(bundle, LARGE_FILES)
    if not os.path.isfile(path):
        return None
    try:
        entries = ConfigParser.load_config_file(path).get("large_files") or []
    except Exception:  # an unreadable old manifest is replaced anyway
        return None
    urls = [e.get("url") for e in entries if isinstance(e, dict) and e.get("path") == WEIGHTS]
    return urls[0] if urls and urls[0] and urls[0] != URL_PLACEHOLDER else None


def pack_bundle(
    bundle_dir: str,
    output: str | None = None,
    version: str | None = None,
    changelog: str | None = None,
    url: str | None = None,
    name: str | None = None,
) -> str:
    """Pack ``bundle_dir`` into a zip for ``python -m monai.bundle download --url``; returns the zip's path.

    Args:
        bundle_dir: a trained bundle folder (``configs/metadata.json`` and ``models/model.pt``).
        output: the zip to write; default ``./<name>_v<version>.zip`` (the model zoo's naming).
        version: the packed metadata's new ``version`` (``MAJOR.MINOR.PATCH``, newer than the current one); adds a
            changelog line. ``None``: metadata unchanged.
        changelog: the changelog line for ``version``; default: one naming the weights' SHA-256.
        url: the URL of ``models/model.pt`` for ``large_files.yml``; default: the bundle's own large_files.yml's, or
            a placeholder to fill in.
        name: the bundle's name (the zip's top folder, ``download --name``); default: the folder's name.

    Raises:
        FileNotFoundError: not a bundle folder (no ``configs/metadata.json``), or no ``models/model.pt``.
        ValueError: unreadable metadata, a bad ``--version``, weights that are not a state dict.
    """
    from hybridmim_components.weights.transfer import file_hash

    bundle = os.path.abspath(bundle_dir)
    name = name or os.path.basename(bundle.rstrip(os.sep))
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_-]*$", name):
        raise ValueError(f"bundle name {name!r}: use letters, digits, '_' and '-' (it names the zip's top folder).")
    metadata_path = os.path.join(bundle, METADATA)
    weights_path = os.path.join(bundle, WEIGHTS)
    if not os.path.isdir(bundle) or not os.path.isfile(metadata_path):
        raise FileNotFoundError(f"{bundle_dir} is not a bundle folder: {metadata_path} not found.")
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(
            f"no trained weights to pack: {weights_path} not found. Train the bundle first "
            f"(python -m monai.bundle run --config_file {os.path.join(bundle_dir, 'configs', 'train.json')} ...); "
            "it saves its best backbone there."
        )
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {metadata_path}: {e}") from e
    current = str(metadata.get("version", ""))

    _check_weights(weights_path)
    digest = file_hash(weights_path, "sha256")
    metadata_text = None  # None: pack the file as it is
    if version is not None:
        new, old = _parse_version(version), _parse_version(current)
        if new is None or (old is not None and new <= old):
            raise ValueError(
                f"--version {version}: expected MAJOR.MINOR.PATCH newer than the bundle's version {current} "
                f"(in {metadata_path})."
            )
        line = changelog or f"pretrained weights models/model.pt, sha256 {digest}"
        # newest first, as the model zoo's metadata lists it
        older = {k: v for k, v in metadata.get("changelog", {}).items() if k != version}
        metadata["changelog"] = {version: line, **older}
        metadata["version"] = version
        metadata_text = json.dumps(metadata, indent=4) + "\n"
    elif changelog is not None:
        raise ValueError("--changelog needs --version (a changelog line belongs to a new version).")
    version = version or current

    # the trained settings travel in the configs (their defaults compute what the weights computed in training)
    from hybridmim_components.weights.provenance import read_provenance

    record = read_provenance(weights_path)
    replaced: dict[str, bytes] = {}
    config_notes: list[str] = []
    if record is None:
        print(f"  warning: {PROVENANCE} not found: the packed configs keep their own settings, which nothing can check "
              "against the ones the weights were trained with", file=sys.stderr)
    else:
        for rel, (text, notes) in trained_configs(bundle, record).items():
            replaced[rel] = text.encode()
            config_notes += [f"{rel}: {n}" for n in notes]
        replaced[PROVENANCE] = _packed_record(record, digest).encode()
    required = metadata.setdefault("required_packages_version", {})
    if "hybridmim-components" not in required:
        import hybridmim_components

        required["hybridmim-components"] = hybridmim_components.__version__
        metadata_text = json.dumps(metadata, indent=4) + "\n"
    if metadata_text is not None:
        replaced[METADATA] = metadata_text.encode()

    included, left_out = _bundle_files(bundle)
    record_digest = hashlib.sha256(replaced[PROVENANCE]).hexdigest() if PROVENANCE in replaced else None
    large_files = _large_files_yml(name, digest, url or _existing_url(bundle) or URL_PLACEHOLDER, record_digest)
    # the old manifest is replaced; placeholders such as models/.gitkeep are not worth a mention
    left_out = [f for f in left_out if f != LARGE_FILES and not os.path.basename(f).startswith(".")]
    members = {rel: os.path.join(bundle, rel) for rel in included}
    members[LARGE_FILES] = None

    output = os.path.abspath(output or f"{name}_v{version}.zip")
    # a failed run never leaves a half-written zip behind
    with atomic_path(output) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel in sorted(members):
                info = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                if rel == LARGE_FILES:
                    data = large_files.encode()
                elif rel in replaced:
                    data = replaced[rel]
                else:
                    with open(members[rel], "rb") as f:
                        data = f.read()
                zf.writestr(info, data)

    print(f"packed {name} {version} -> {output}")
    print(f"  {len(members)} files; models/model.pt sha256 {digest} (in {LARGE_FILES})")
    if config_notes:
        print(f"  trained settings written into the configs ({PROVENANCE}):")
        for note in config_notes:
            print(f"    {note}")
    if left_out:
        shown = ", ".join(left_out[:8]) + (f", ... (+{len(left_out) - 8})" if len(left_out) > 8 else "")
        print(f"  left out (training outputs, caches): {shown}")
    print("download it with:")
    print(f"  python -m monai.bundle download --name {name} --url file://{output} --bundle_dir <folder>")
    print(f"and finetune from <folder>/{name} with --pretrained_path <folder>/{name}")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pack_bundle.py",
        description="Pack a trained pretraining bundle (configs, docs, LICENSE, models/model.pt, large_files.yml) "
        "into a zip for `python -m monai.bundle download --name <name> --url <url of the zip>`.",
    )
    parser.add_argument("bundle_dir", help="the trained bundle folder, e.g. bundles/hybridmim_unet_pretrain")
    parser.add_argument("--output", help="zip to write (default: ./<name>_v<version>.zip)")
    parser.add_argument("--version", help="new metadata version MAJOR.MINOR.PATCH; adds a changelog line")
    parser.add_argument("--changelog", help="the changelog line for --version (default: names the weights' sha256)")
    parser.add_argument("--url", help=f"URL of models/model.pt for large_files.yml (default: {URL_PLACEHOLDER!r})")
    parser.add_argument("--name", help="bundle name, the zip's top folder (default: the folder's name)")
    args = parser.parse_args(argv)
    try:
        pack_bundle(args.bundle_dir, output=args.output, version=args.version, changelog=args.changelog,
                    url=args.url, name=args.name)
    except (FileNotFoundError, ValueError) as e:
        print(f"pack_bundle.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
