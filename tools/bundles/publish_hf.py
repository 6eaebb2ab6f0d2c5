"""Publish a packed bundle on the Hugging Face Hub as the MONAI model zoo publishes its bundles, through MONAI's own
``python -m monai.bundle push_to_hf_hub``.

    python tools/bundles/publish_hf.py dist/hybridmim_unet_pretrain_v0.2.1.zip --repo <owner>/hybridmim_unet_pretrain
    python -m monai.bundle download --name hybridmim_unet_pretrain --source huggingface_hub \\
        --repo <owner>/hybridmim_unet_pretrain --version 0.2.1 --bundle_dir downloaded

The input is a zip written by ``tools/bundles/pack_bundle.py`` or a trained bundle folder (packed first, so the Hub
gets exactly what a zip would hold). The upload folder is laid out as the zoo's CI lays out a bundle it hosts on the
Hub (``ci/utils.py`` of Project-MONAI/model-zoo: the bundle folder with its large files in place and
``large_files.yml`` removed, one Hub repository per bundle, a tag per version, the commit message
``Upload <name> version <version>``):

- the bundle's files at the repository root (``configs/``, ``docs/``, ``scripts/``, ``LICENSE``, ``models/model.pt``
  and its record); every file ``large_files.yml`` lists must be there with its hash, then the manifest is dropped
  (the Hub hosts the files; its url would be a placeholder);
- ``LICENSE.weights`` beside ``LICENSE`` when the weights' terms differ from the code's Apache-2.0: the weights are
  derived from their training data and inherit its terms, which ``docs/data_license.txt`` states (or
  ``--weights-license FILE``); the model card says which file covers what;
- ``README.md``: MONAI's ``push_to_hf_hub`` copies ``docs/README.md`` there with the Hub's card header (tags
  ``monai``, ``medical``, ``library_name: monai``, the licence of ``LICENSE``).

MONAI then creates the repository (private unless ``--public``), uploads the folder and tags the commit with the
bundle's ``version`` (``configs/metadata.json``). ``download --source huggingface_hub`` without ``--version`` takes
the ``latest_version`` tag: MONAI creates it only where it does not exist yet (its ``create_tag(exist_ok=True)``
leaves an existing tag where it is), so this tool moves it to the new version itself. A version already on the Hub
is refused: its tag would keep pointing at the old upload (re-pack with ``pack_bundle.py --version``).

``--dry-run`` prepares the folder (``--staging DIR`` keeps it) and prints MONAI's command instead of running it.
Authentication is huggingface_hub's: ``hf auth login`` once, ``HF_TOKEN``, or ``--token``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:  # run as a script: tools.bundles.pack_bundle for folders
    sys.path.insert(0, REPO_ROOT)

from hybridmim_components.weights.transfer import LARGE_FILES_NAMES, _manifest_entries, verify_weights_hash  # noqa: E402

__all__ = ["prepare_upload_folder", "publish", "main", "UploadFolder", "LATEST_TAG"]

METADATA = "configs/metadata.json"
DATA_LICENSE = "docs/data_license.txt"
MODEL_CARD_SOURCE = "docs/README.md"  # what push_to_hf_hub turns into the repository's README.md
WEIGHTS_DIR = "models/"
LATEST_TAG = "latest_version"  # the tag `monai.bundle download --source huggingface_hub` takes without --version
_SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class UploadFolder:
    """A prepared upload: ``root/name`` is the folder MONAI pushes (``push_to_hf_hub(bundle_dir=root, name=name)``)."""

    root: str
    name: str
    version: str
    weights_license: bool  # LICENSE.weights written

    @property
    def folder(self) -> str:
        return os.path.join(self.root, self.name)


def _is_apache_2(text: str) -> bool:
    # the rule MONAI's push_to_hf_hub applies to LICENSE for the card's `license: apache-2.0`
    return "Apache License" in text and "Version 2.0" in text


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _unpack(zip_path: str, root: str) -> str:
    """Extract a packed bundle zip into ``root``; returns the bundle's name (the zip's single top folder)."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{zip_path}: not a readable zip ({e}); expected one written by tools/bundles/pack_bundle.py.")
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        tops = {n.split("/", 1)[0] for n in names}
        bad = [n for n in names if n.startswith("/") or ".." in n.split("/") or "/" not in n]
        if len(tops) != 1 or bad:
            raise ValueError(
                f"{zip_path}: expected one top folder named after the bundle (as pack_bundle.py and "
                f"`monai.bundle download` lay a bundle zip out), found top entries {sorted(tops)[:5]}"
                + (f" and unsafe or loose paths {bad[:3]}" if bad else "") + "."
            )
        name = tops.pop()
        if not _NAME.match(name):
            raise ValueError(f"{zip_path}: top folder {name!r} is not a bundle name (letters, digits, '_', '-').")
        zf.extractall(root, members=names)
    return name


def _check_metadata(folder: str) -> str:
    """The bundle's ``version``, checked as the zoo's CI checks it (MAJOR.MINOR.PATCH, listed in the changelog)."""
    path = os.path.join(folder, METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a bundle: {path} not found.")
    try:
        meta = json.loads(_read(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    version = str(meta.get("version", ""))
    if not _SEMVER.match(version):
        raise ValueError(f"{path}: version {version!r}: expected MAJOR.MINOR.PATCH (it becomes the Hub tag).")
    if version not in (meta.get("changelog") or {}):
        raise ValueError(f"{path}: version {version} has no line in 'changelog' (the model zoo requires one).")
    if not os.path.isfile(os.path.join(folder, "LICENSE")):
        raise FileNotFoundError(f"{os.path.join(folder, 'LICENSE')} not found: a published bundle needs its licence.")
    return version


def _place_large_files(folder: str) -> None:
    """Every file a ``large_files`` manifest lists must be in the folder with the listed hash; then the manifest goes
    (the zoo uploads the files themselves and drops the manifest)."""
    for manifest_name in LARGE_FILES_NAMES:
        manifest = os.path.join(folder, manifest_name)
        if not os.path.isfile(manifest):
            continue
        for entry in _manifest_entries(manifest):
            rel = str(entry.get("path", ""))
            if not os.path.isfile(os.path.join(folder, rel)):
                raise FileNotFoundError(
                    f"{manifest} lists {rel!r}, which is not in the bundle: fetch it first "
                    f"(python -m monai.bundle download_large_files --bundle_path <bundle folder>) and publish that "
                    "folder, or re-pack the trained bundle with tools/bundles/pack_bundle.py."
                )
            verify_weights_hash(folder, rel)  # WeightsHashError names the file and both digests
        os.remove(manifest)


def _write_weights_license(folder: str, weights_license: str | None) -> bool:
    """``LICENSE.weights`` when the weights' terms differ from the code's; returns whether it was written."""
    weights_dir = os.path.join(folder, WEIGHTS_DIR)
    has_weights = os.path.isdir(weights_dir) and any(not e.name.startswith(".") for e in os.scandir(weights_dir))
    if weights_license is not None:
        if not os.path.isfile(weights_license):
            raise FileNotFoundError(f"--weights-license {weights_license}: no such file.")
        terms, source = _read(weights_license), weights_license
    elif os.path.isfile(os.path.join(folder, DATA_LICENSE)):
        terms, source = _read(os.path.join(folder, DATA_LICENSE)), DATA_LICENSE
    elif has_weights:
        raise FileNotFoundError(
            f"{os.path.join(folder, DATA_LICENSE)} not found: the weights inherit the terms of their training data, "
            "and nothing says what they are. Add the data's terms there, or give --weights-license FILE (a text "
            "naming the weights' licence; an Apache-2.0 text means the same licence as the code)."
        )
    else:
        return False
    if not terms.strip():
        raise ValueError(f"{source} is empty: expected the terms of the data the weights were trained on.")
    if _is_apache_2(terms) and _is_apache_2(_read(os.path.join(folder, "LICENSE"))):
        return False  # the weights come under the code's licence: LICENSE covers them
    with open(os.path.join(folder, "LICENSE.weights"), "w", encoding="utf-8") as f:
        f.write(
            "Licence of the trained weights (models/)\n"
            "=========================================\n\n"
            "LICENSE (Apache License 2.0) covers this bundle's code and configs, not its trained weights. The\n"
            "weights are derived from the data they were trained on and come under that data's terms:\n\n"
            f"{terms.rstrip()}\n"
        )
    card = os.path.join(folder, MODEL_CARD_SOURCE)
    if os.path.isfile(card):  # the Hub card's `license:` is the code's (MONAI reads LICENSE): say what covers what
        with open(card, "a", encoding="utf-8") as f:
            f.write(
                "\n## Licence of the weights\n\n"
                "`LICENSE` (Apache License 2.0) covers the code and configs. The trained weights in `models/` are "
                "derived from their training data and come under its terms: see `LICENSE.weights`.\n"
            )
    return True


def prepare_upload_folder(source: str, root: str, weights_license: str | None = None) -> UploadFolder:
    """Lay out ``source`` (a packed zip or a trained bundle folder) in ``root/<name>`` for ``push_to_hf_hub``.

    Raises:
        FileNotFoundError: no such source, no metadata or LICENSE, a listed large file missing, no data terms.
        ValueError: a zip not in pack_bundle's layout, a version that is not MAJOR.MINOR.PATCH or has no changelog
            line, a file whose hash differs from ``large_files.yml`` (``WeightsHashError``).
    """
    source = os.path.abspath(source)
    os.makedirs(root, exist_ok=True)
    if os.path.isdir(source):
        from tools.bundles.pack_bundle import pack_bundle

        # a folder goes through the same packing as a shared zip: what the Hub gets is what a zip would hold (its
        # "download it with --url" advice is for a zip the user keeps, not this temporary one)
        with contextlib.redirect_stdout(io.StringIO()):
            source = pack_bundle(source, output=os.path.join(root, "packed.zip"))
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: no such bundle zip or folder.")
    unpacked = os.path.join(root, "bundle")
    name = _unpack(source, unpacked)
    if os.path.exists(os.path.join(root, name)):
        raise FileExistsError(f"{os.path.join(root, name)} exists: use an empty staging folder.")
    shutil.move(os.path.join(unpacked, name), os.path.join(root, name))
    shutil.rmtree(unpacked)
    if os.path.isfile(os.path.join(root, "packed.zip")):
        os.remove(os.path.join(root, "packed.zip"))
    folder = os.path.join(root, name)
    version = _check_metadata(folder)
    _place_large_files(folder)
    written = _write_weights_license(folder, weights_license)
    return UploadFolder(root=root, name=name, version=version, weights_license=written)


def _existing_tags(repo: str, token: str | None) -> list[str]:
    """The repository's tags; none when it does not exist yet (MONAI creates it)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return [t.name for t in HfApi(token=token).list_repo_refs(repo).tags]
    except RepositoryNotFoundError:
        return []


def monai_command(upload: UploadFolder, repo: str, private: bool) -> str:
    """The ``python -m monai.bundle push_to_hf_hub`` command for a prepared folder."""
    return (f"python -m monai.bundle push_to_hf_hub --repo {repo} --name {upload.name} --bundle_dir {upload.root} "
            f"--version {upload.version} --private {private}")


def publish(source: str, repo: str, token: str | None = None, private: bool = True, latest: bool = True,
            weights_license: str | None = None, staging: str | None = None, dry_run: bool = False) -> UploadFolder:
    """Prepare ``source`` and push it to the Hub repository ``repo`` (``owner/name``) with MONAI's ``push_to_hf_hub``.

    Args:
        source: a zip written by ``pack_bundle.py``, or a trained bundle folder (packed first).
        repo: the Hub repository, ``<user or organisation>/<name>`` (the zoo names it after the bundle).
        token: a Hub token; default: huggingface_hub's (``hf auth login``, ``HF_TOKEN``).
        private: create the repository private (MONAI's default); an existing one keeps its visibility.
        latest: move the ``latest_version`` tag to this version (what ``download`` takes without ``--version``).
        weights_license: a text file with the weights' licence; default: the bundle's ``docs/data_license.txt``.
        staging: where to prepare the folder (kept); default: a temporary folder, removed after a push (kept by a
            dry run, whose command points at it).
        dry_run: prepare and print MONAI's command, push nothing.

    Raises:
        ValueError: a repository id not ``owner/name``; a version already tagged on the Hub; see
            :func:`prepare_upload_folder` for the bundle's own checks.
    """
    if not _REPO.match(repo):
        raise ValueError(f"--repo {repo!r}: expected <user or organisation>/<repository name>, e.g. "
                         "my-lab/hybridmim_unet_pretrain.")
    root = os.path.abspath(staging) if staging else tempfile.mkdtemp(prefix="publish_hf_")
    try:
        upload = prepare_upload_folder(source, root, weights_license)
        print(f"prepared {upload.name} {upload.version} in {upload.folder}"
              + (" (LICENSE.weights: the weights' terms differ from the code's)" if upload.weights_license else ""))
        if dry_run:
            print("dry run, nothing pushed; MONAI's command for this folder:")
            print("  " + monai_command(upload, repo, private))
            return upload
        try:
            import huggingface_hub  # noqa: F401  (MONAI's push_to_hf_hub imports it optionally)
        except ImportError as e:
            raise ImportError("publishing needs huggingface_hub: pip install huggingface_hub") from e
        from monai.bundle import push_to_hf_hub

        tags = _existing_tags(repo, token)
        if upload.version in tags:
            raise ValueError(
                f"version {upload.version} of {upload.name} is already on the Hub ({repo}, tag {upload.version}): "
                "the tag would keep pointing at the earlier upload. Re-pack with a new version "
                "(tools/bundles/pack_bundle.py <bundle> --version X.Y.Z) and publish that zip."
            )
        move_latest = latest and LATEST_TAG in tags
        url = push_to_hf_hub(
            repo=repo, name=upload.name, bundle_dir=upload.root, token=token, private=private,
            version=upload.version, tag_as_latest_version=latest and not move_latest,
            commit_message=f"Upload {upload.name} version {upload.version}",
        )
        if move_latest:  # MONAI's create_tag(exist_ok=True) would leave it on an earlier version
            from huggingface_hub import HfApi

            api = HfApi(token=token)
            api.delete_tag(repo, tag=LATEST_TAG)
            api.create_tag(repo, tag=LATEST_TAG, revision=upload.version)
        print(f"published {upload.name} {upload.version} to {url}")
        print("download it with:")
        print(f"  python -m monai.bundle download --name {upload.name} --source huggingface_hub --repo {repo} "
              f"--version {upload.version} --bundle_dir <folder>")
        return upload
    finally:
        if staging is None and not dry_run:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="publish_hf.py",
        description="Publish a packed bundle (zip from pack_bundle.py, or a trained bundle folder) on the Hugging "
        "Face Hub with MONAI's push_to_hf_hub, laid out as the MONAI model zoo lays out its bundles there.",
    )
    parser.add_argument("source", help="a zip written by tools/bundles/pack_bundle.py, or a trained bundle folder")
    parser.add_argument("--repo", required=True, help="Hub repository <user or organisation>/<name>")
    parser.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    parser.add_argument("--not-latest", action="store_true",
                        help=f"leave the {LATEST_TAG!r} tag where it is (e.g. publishing a fix of an older version)")
    parser.add_argument("--weights-license", help=f"text file with the weights' licence (default: {DATA_LICENSE})")
    parser.add_argument("--token", help="Hub token (default: huggingface_hub's login or HF_TOKEN)")
    parser.add_argument("--staging", help="prepare the upload folder here and keep it (default: a temporary folder)")
    parser.add_argument("--dry-run", action="store_true", help="prepare and print MONAI's command, push nothing")
    args = parser.parse_args(argv)
    try:
        publish(args.source, args.repo, token=args.token, private=not args.public, latest=not args.not_latest,
                weights_license=args.weights_license, staging=args.staging, dry_run=args.dry_run)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"publish_hf.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
