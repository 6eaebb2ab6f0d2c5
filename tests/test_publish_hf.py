"""Publishing on the Hugging Face Hub (tools/bundles/publish_hf.py) through MONAI's push_to_hf_hub, up to the network.

The huggingface_hub calls MONAI and the tool make (``HfApi.list_repo_refs``, ``create_repo``, ``upload_folder``,
``create_tag``, ``delete_tag``; ``snapshot_download`` for the recipient) are patched with their real signatures
(``autospec``) onto a small in-memory Hub that keeps a copy of each uploaded folder and tags as the Hub does
(``create_tag(exist_ok=True)`` leaves an existing tag where it is). What is asserted: the upload folder's layout and
metadata, LICENSE.weights, the model card, the version and ``latest_version`` tags, the refusals, and that
``python -m monai.bundle download --source huggingface_hub`` gets back a bundle whose weights match the packed ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import RepositoryNotFoundError  # noqa: E402

from hybridmim_components import HybridMIMUNet  # noqa: E402
from hybridmim_components.weights.transfer import WeightsHashError  # noqa: E402
from tools.bundles import publish_hf  # noqa: E402
from tools.bundles.pack_bundle import pack_bundle  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "hybridmim_unet_pretrain"
SOURCE_BUNDLE = os.path.join(REPO_ROOT, "bundles", NAME)
HUB_REPO = "my-lab/hybridmim_unet_pretrain"
FEATURES = [4, 4, 8, 8, 16, 4]
APACHE_TEXT = os.path.join(REPO_ROOT, "LICENSE")


def sha256_of(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class FakeHub:
    """One Hub repository: commits are copies of the uploaded folders; tags name commits."""

    def __init__(self, root, tags=()):
        self.root = str(root)
        self.exists = bool(tags)
        self.commits: list[str] = []
        self.tags = {t: "earlier-commit" for t in tags}
        self.calls: list[tuple] = []

    def list_repo_refs(self, api, repo_id, **kw):
        self.calls.append(("list_repo_refs", repo_id))
        if not self.exists:
            raise RepositoryNotFoundError(f"404 {repo_id}", response=mock.Mock(headers={}, request=None))
        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in self.tags],
                               branches=[SimpleNamespace(name="main")])

    def create_repo(self, api, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))
        self.exists = True

    def upload_folder(self, api, *, repo_id, folder_path, **kw):
        self.calls.append(("upload_folder", repo_id, kw))
        commit = os.path.join(self.root, f"commit{len(self.commits)}")
        shutil.copytree(folder_path, commit)
        self.commits.append(commit)
        return f"https://huggingface.co/{repo_id}/commit/{len(self.commits) - 1}"

    def create_tag(self, api, repo_id, *, tag, revision=None, exist_ok=False, **kw):
        self.calls.append(("create_tag", tag, revision))
        if tag in self.tags:
            if exist_ok:
                return  # the Hub's 409, swallowed: the tag stays where it was
            raise ValueError(f"tag {tag} exists")
        self.tags[tag] = self.commits[-1] if revision is None else self.tags.get(revision, revision)

    def delete_tag(self, api, repo_id, *, tag, **kw):
        self.calls.append(("delete_tag", tag))
        del self.tags[tag]

    def snapshot_download(self, repo_id, *, revision=None, local_dir=None, **kw):
        commit = self.tags[revision] if revision else self.commits[-1]
        shutil.copytree(commit, local_dir, dirs_exist_ok=True)
        return local_dir

    def patches(self):
        """Patch huggingface_hub where MONAI and the tool call it (real signatures: a wrong argument fails)."""
        stack = [mock.patch.object(HfApi, m, autospec=True, side_effect=getattr(self, m))
                 for m in ("list_repo_refs", "create_repo", "upload_folder", "create_tag", "delete_tag")]
        stack.append(mock.patch.object(huggingface_hub, "snapshot_download", autospec=True,
                                       side_effect=self.snapshot_download))
        # MONAI's download looks the tags up with the module-level function (a method of a default HfApi)
        stack.append(mock.patch.object(huggingface_hub, "list_repo_refs", autospec=True,
                                       side_effect=lambda repo_id, **kw: self.list_repo_refs(None, repo_id, **kw)))
        return stack

    def __enter__(self):
        self._active = self.patches()
        for p in self._active:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._active):
            p.stop()

    def names(self, kind):
        return [c for c in self.calls if c[0] == kind]


@pytest.fixture
def trained_bundle(tmp_path):
    """The UNet pretraining bundle as a training run leaves it (a tiny backbone in models/model.pt)."""
    root = tmp_path / "work" / NAME
    shutil.copytree(SOURCE_BUNDLE, root, ignore=shutil.ignore_patterns("*.pt", "*.ts", "eval", "runs"))
    torch.manual_seed(0)
    torch.save(HybridMIMUNet(features=FEATURES).backbone.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture
def packed(trained_bundle, tmp_path):
    """A zip as pack_bundle.py writes it, at a new version (what a user publishes)."""
    version = json.loads((trained_bundle / "configs" / "metadata.json").read_text())["version"]
    major, minor, patch = (int(p) for p in version.split("."))
    new = f"{major}.{minor}.{patch + 1}"
    return pack_bundle(str(trained_bundle), version=new, changelog="pretrained on 2 CT volumes",
                       output=str(tmp_path / "dist" / f"{NAME}_v{new}.zip")), new


def test_first_publish_uploads_the_zoo_layout_and_tags_the_version(packed, tmp_path):
    zip_path, version = packed
    with zipfile.ZipFile(zip_path) as zf:
        packed_files = {n.split("/", 1)[1] for n in zf.namelist() if not n.endswith("/")}
        packed_meta = json.loads(zf.read(f"{NAME}/configs/metadata.json"))
    with FakeHub(tmp_path / "hub") as hub:
        assert publish_hf.main([zip_path, "--repo", HUB_REPO]) == 0

    [(_, repo_id, create_kw)] = hub.names("create_repo")
    assert repo_id == HUB_REPO and create_kw["private"] is True and create_kw["exist_ok"] is True
    [(_, repo_id, upload_kw)] = hub.names("upload_folder")
    assert upload_kw["commit_message"] == f"Upload {NAME} version {version}"  # the zoo's message
    [uploaded] = hub.commits
    files = {os.path.relpath(os.path.join(d, f), uploaded).replace(os.sep, "/")
             for d, _, fs in os.walk(uploaded) for f in fs}
    # the bundle at the repository root, the large file in place of its manifest, the card and the weights' licence
    assert files == (packed_files - {"large_files.yml"}) | {"README.md", "LICENSE.weights"}, files
    assert {"configs/metadata.json", "models/model.pt", "LICENSE", "docs/README.md"} <= files
    meta = json.loads(open(os.path.join(uploaded, "configs", "metadata.json")).read())
    assert meta == packed_meta and meta["version"] == version
    assert meta["required_packages_version"]["hybridmim-components"]  # installs without this repository
    with zipfile.ZipFile(zip_path) as zf:
        listed = zf.read(f"{NAME}/large_files.yml").decode()
    assert sha256_of(os.path.join(uploaded, "models", "model.pt")) in listed

    card = open(os.path.join(uploaded, "README.md")).read()
    assert card.startswith("---\ntags:\n- monai\n- medical\nlibrary_name: monai\nlicense: apache-2.0\n---\n"), card[:200]
    assert "LICENSE.weights" in card  # the card's licence is the code's: it says what covers the weights
    weights_license = open(os.path.join(uploaded, "LICENSE.weights")).read()
    data_terms = open(os.path.join(SOURCE_BUNDLE, "docs", "data_license.txt")).read()
    assert data_terms.strip() in weights_license and "models/" in weights_license
    assert "Apache License" in open(os.path.join(uploaded, "LICENSE")).read()

    assert hub.tags == {version: uploaded, "latest_version": uploaded}
    assert [c for c in hub.calls if c[0] == "delete_tag"] == []


def test_a_new_version_moves_latest_version(packed, tmp_path):
    zip_path, version = packed
    with FakeHub(tmp_path / "hub", tags=["0.0.1", "latest_version"]) as hub:
        publish_hf.publish(zip_path, HUB_REPO)
    [uploaded] = hub.commits
    assert hub.tags[version] == uploaded
    assert hub.tags["latest_version"] == uploaded  # MONAI alone would have left it on the earlier commit
    assert hub.tags["0.0.1"] == "earlier-commit"

    with FakeHub(tmp_path / "hub2", tags=["9.9.9", "latest_version"]) as hub:
        publish_hf.publish(zip_path, HUB_REPO, latest=False)  # a fix of an older line: latest stays
    assert hub.tags["latest_version"] == "earlier-commit" and hub.tags[version] == hub.commits[0]


def test_a_version_already_on_the_hub_is_refused_before_any_upload(packed, tmp_path, capsys):
    zip_path, version = packed
    with FakeHub(tmp_path / "hub", tags=[version]) as hub:
        assert publish_hf.main([zip_path, "--repo", HUB_REPO]) == 1
    err = capsys.readouterr().err
    assert f"version {version}" in err and HUB_REPO in err and "--version" in err
    assert hub.names("upload_folder") == [] and hub.names("create_repo") == []


def test_the_recipient_downloads_it_with_monai(packed, tmp_path):
    """``monai.bundle download --source huggingface_hub --repo ...`` (with and without --version) lands the bundle in
    ``<bundle_dir>/<name>`` with the packed weights."""
    from monai.bundle import download

    zip_path, version = packed
    with zipfile.ZipFile(zip_path) as zf:
        weights = hashlib.sha256(zf.read(f"{NAME}/models/model.pt")).hexdigest()
    with FakeHub(tmp_path / "hub") as hub:
        publish_hf.publish(zip_path, HUB_REPO)
        download(name=NAME, source="huggingface_hub", repo=HUB_REPO, version=version,
                 bundle_dir=str(tmp_path / "pinned"), progress=False)
        download(name=NAME, source="huggingface_hub", repo=HUB_REPO, bundle_dir=str(tmp_path / "latest"),
                 progress=False)
    for where in ("pinned", "latest"):
        bundle = tmp_path / where / NAME
        assert sha256_of(bundle / "models" / "model.pt") == weights, where
        assert json.loads((bundle / "configs" / "metadata.json").read_text())["version"] == version
        assert (bundle / "LICENSE.weights").is_file()


def test_weights_under_the_codes_licence_get_no_license_weights(packed, tmp_path):
    zip_path, _ = packed
    upload = publish_hf.prepare_upload_folder(zip_path, str(tmp_path / "stage"), weights_license=APACHE_TEXT)
    assert not upload.weights_license and not os.path.exists(os.path.join(upload.folder, "LICENSE.weights"))
    assert "Licence of the weights" not in open(os.path.join(upload.folder, "docs", "README.md")).read()


def test_weights_without_data_terms_are_refused(trained_bundle, tmp_path):
    os.remove(trained_bundle / "docs" / "data_license.txt")
    zip_path = pack_bundle(str(trained_bundle), output=str(tmp_path / "b.zip"))
    with pytest.raises(FileNotFoundError, match=r"docs/data_license\.txt.*--weights-license"):
        publish_hf.prepare_upload_folder(zip_path, str(tmp_path / "stage"))


def _rewrite_zip(src, dst, drop=(), replace=None):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info.filename)
            zout.writestr(info, (replace or {}).get(info.filename, data))
    return str(dst)


def test_a_missing_or_altered_large_file_stops_and_names_it(packed, tmp_path):
    zip_path, _ = packed
    missing = _rewrite_zip(zip_path, tmp_path / "missing.zip", drop=(f"{NAME}/models/model.pt",))
    with pytest.raises(FileNotFoundError, match=r"models/model\.pt.*download_large_files"):
        publish_hf.prepare_upload_folder(missing, str(tmp_path / "s1"))
    with zipfile.ZipFile(zip_path) as zf:
        weights = zf.read(f"{NAME}/models/model.pt")
    altered = _rewrite_zip(zip_path, tmp_path / "altered.zip",
                           replace={f"{NAME}/models/model.pt": weights[:-8] + b"\0" * 8})
    with pytest.raises(WeightsHashError, match=r"model\.pt"):
        publish_hf.prepare_upload_folder(altered, str(tmp_path / "s2"))


def test_a_folder_is_packed_first_and_a_dry_run_pushes_nothing(trained_bundle, tmp_path, capsys):
    stage = tmp_path / "stage"
    with FakeHub(tmp_path / "hub") as hub:
        assert publish_hf.main([str(trained_bundle), "--repo", HUB_REPO, "--dry-run", "--staging", str(stage)]) == 0
    assert hub.calls == []
    out = capsys.readouterr().out
    assert f"python -m monai.bundle push_to_hf_hub --repo {HUB_REPO} --name {NAME} --bundle_dir {stage}" in out
    assert sorted(os.listdir(stage)) == [NAME]  # nothing else beside the folder MONAI would push
    folder = stage / NAME
    assert (folder / "models" / "model.pt").is_file() and (folder / "LICENSE.weights").is_file()
    assert not (folder / "large_files.yml").exists() and not (folder / "README.md").exists()  # MONAI writes the card
    assert sha256_of(folder / "models" / "model.pt") == sha256_of(trained_bundle / "models" / "model.pt")
    assert not (trained_bundle / "LICENSE.weights").exists()  # the source folder is left alone


@pytest.mark.parametrize("repo", ["hybridmim_unet_pretrain", "a/b/c", "/x"])
def test_a_repository_id_that_is_not_owner_slash_name_is_refused(packed, repo):
    with pytest.raises(ValueError, match="owner|organisation"):
        publish_hf.publish(packed[0], repo, dry_run=True)
