"""hybridmim_components.workflow.data.load_datalist: path resolution, entry forms, errors, label_fraction selection."""
import json
import os

import pytest

from hybridmim_components.workflow.data import fraction_indices, load_datalist, select_fraction


def _touch(root, *rels):
    for rel in rels:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").close()


def _write(path, content):
    with open(path, "w") as f:
        f.write(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.fixture
def ds(tmp_path):
    """A dataset folder with 10 training cases, 1 validation case, 2 test images and datalist.json."""
    root = str(tmp_path / "ds")
    train = [{"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"} for i in range(10)]
    for e in train:
        _touch(root, e["image"], e["label"])
    _touch(root, "imagesTr/v.nii.gz", "labelsTr/v.nii.gz", "imagesTs/t0.nii.gz", "imagesTs/t1.nii.gz")
    _write(os.path.join(root, "datalist.json"), {
        "training": train,
        "validation": [{"image": "imagesTr/v.nii.gz", "label": "labelsTr/v.nii.gz"}],
        "testing": ["imagesTs/t0.nii.gz", {"image": "./imagesTs/t1.nii.gz"}],
    })
    return root


def test_relative_paths_resolved_against_dataset_dir(ds):
    items = load_datalist(ds, "datalist.json", "training", required_keys=("image", "label"))
    assert len(items) == 10
    assert items[3] == {"image": os.path.join(ds, "imagesTr", "c3.nii.gz"),
                        "label": os.path.join(ds, "labelsTr", "c3.nii.gz")}


def test_absolute_datalist_path_and_absolute_entries_kept(ds, tmp_path):
    elsewhere = str(tmp_path / "elsewhere")
    _touch(elsewhere, "x.nii.gz")
    datalist = _write(tmp_path / "abs.json", {"training": [
        {"image": os.path.join(elsewhere, "x.nii.gz"), "label": "labelsTr/c0.nii.gz"}]})
    (item,) = load_datalist(ds, datalist, "training")
    assert item["image"] == os.path.join(elsewhere, "x.nii.gz")  # absolute: kept
    assert item["label"] == os.path.join(ds, "labelsTr", "c0.nii.gz")  # relative: against dataset_dir


def test_string_entries_become_image_dicts(ds):
    items = load_datalist(ds, "datalist.json", "testing")
    assert items == [{"image": os.path.join(ds, "imagesTs", "t0.nii.gz")},
                     {"image": os.path.join(ds, "imagesTs", "t1.nii.gz")}]


def test_brats_image_lists_resolved_each(tmp_path):
    root = str(tmp_path)
    mods = [f"case/case_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    _touch(root, *mods, "case/case_seg.nii.gz")
    _write(tmp_path / "d.json", {"training": [{"image": mods, "label": "case/case_seg.nii.gz"}]})
    (item,) = load_datalist(root, "d.json", "training", required_keys=("image", "label"))
    assert item["image"] == [os.path.join(root, m) for m in mods]
    os.remove(os.path.join(root, mods[2]))
    with pytest.raises(FileNotFoundError, match=r"entry 0 'image'.*case_t2\.nii\.gz"):
        load_datalist(root, "d.json", "training")


def test_check_files_false_skips_existence(tmp_path):
    _write(tmp_path / "d.json", {"testing": ["nope.nii.gz"]})
    assert load_datalist(str(tmp_path), "d.json", "testing", check_files=False) == [
        {"image": str(tmp_path / "nope.nii.gz")}]


def test_missing_datalist_file_named(ds):
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_datalist(ds, "missing.json", "training")


def test_invalid_json_names_file(tmp_path):
    path = _write(tmp_path / "bad.json", '{"training": [')
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_datalist(str(tmp_path), path, "training")


def test_missing_key_lists_keys_present(ds):
    with pytest.raises(ValueError, match=r"datalist\.json.*no key 'test'.*'testing', 'training', 'validation'"):
        load_datalist(ds, "datalist.json", "test")


def test_empty_list_named(tmp_path):
    _write(tmp_path / "d.json", {"training": [], "validation": []})
    with pytest.raises(ValueError, match=r"d\.json', key 'validation'.*empty"):
        load_datalist(str(tmp_path), "d.json", "validation")


def test_entry_without_required_key_names_index(ds, tmp_path):
    _write(os.path.join(ds, "d.json"), {"training": [
        {"image": "imagesTr/c0.nii.gz", "label": "labelsTr/c0.nii.gz"}, {"image": "imagesTr/c1.nii.gz"}]})
    with pytest.raises(ValueError, match=r"d\.json', key 'training', entry 1: missing required key\(s\) \['label'\]"):
        load_datalist(ds, "d.json", "training", required_keys=("image", "label"))


def test_malformed_entry_named(tmp_path):
    _write(tmp_path / "d.json", {"training": [{"image": []}], "testing": [3]})
    with pytest.raises(ValueError, match=r"key 'training', entry 0: 'image' must be a path"):
        load_datalist(str(tmp_path), "d.json", "training")
    with pytest.raises(ValueError, match=r"key 'testing', entry 0: expected a dict"):
        load_datalist(str(tmp_path), "d.json", "testing")


def test_missing_files_named_first_few_with_count(tmp_path):
    _write(tmp_path / "d.json", {"training": [{"image": f"img{i}.nii.gz"} for i in range(8)]})
    _touch(str(tmp_path), "img0.nii.gz")
    with pytest.raises(FileNotFoundError) as err:
        load_datalist(str(tmp_path), "d.json", "training")
    msg = str(err.value)
    assert "d.json" in msg and "key 'training'" in msg and "7 referenced file(s)" in msg
    assert "entry 1 'image'" in msg and "img1.nii.gz" in msg and "(and 2 more)" in msg
    assert "img0.nii.gz" not in msg


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True])
def test_label_fraction_out_of_range(ds, bad):
    with pytest.raises(ValueError, match="label_fraction"):
        load_datalist(ds, "datalist.json", "training", label_fraction=bad)


def test_label_fraction_deterministic_nested_ordered(ds):
    full = load_datalist(ds, "datalist.json", "training")
    sizes, previous = [], set()
    for fraction in (0.2, 0.4, 0.6, 1.0):
        a = load_datalist(ds, "datalist.json", "training", label_fraction=fraction)
        b = load_datalist(ds, "datalist.json", "training", label_fraction=fraction)
        assert a == b  # deterministic
        images = [e["image"] for e in a]
        assert images == [e["image"] for e in full if e["image"] in images]  # original order kept
        assert previous <= set(images)  # nested: 20% subset of 40% subset of ...
        previous = set(images)
        sizes.append(len(a))
    assert sizes == [2, 4, 6, 10]
    other_seed = load_datalist(ds, "datalist.json", "training", label_fraction=0.4, seed=1)
    assert len(other_seed) == 4


def test_label_fraction_keeps_at_least_one(ds):
    assert len(load_datalist(ds, "datalist.json", "training", label_fraction=0.01)) == 1
    assert len(load_datalist(ds, "datalist.json", "validation", label_fraction=0.5)) == 1


def test_fraction_helpers():
    assert fraction_indices(10, 1.0) == list(range(10))
    assert select_fraction(list("abcdefghij"), 0.3) == [list("abcdefghij")[i] for i in fraction_indices(10, 0.3)]
    assert set(fraction_indices(100, 0.2)) <= set(fraction_indices(100, 0.5))
    assert fraction_indices(100, 0.2, seed=0) != fraction_indices(100, 0.2, seed=1)


def test_partition_for_rank_without_process_group_is_everything():
    from hybridmim_components.workflow.data import partition_for_rank

    assert partition_for_rank(["a", "b", "c"], shuffle=True, even_divisible=True) == ["a", "b", "c"]


@pytest.mark.parametrize("even,expected", [(False, [["a", "c", "e"], ["b", "d"]]),
                                           (True, [["a", "c", "e"], ["b", "d", "a"]])])
def test_partition_for_rank_shards_under_ddp(monkeypatch, even, expected):
    """Each of 2 processes gets entries r, r + 2, ...; even_divisible repeats the first to equal lengths."""
    import torch.distributed as dist

    from hybridmim_components.workflow.data import partition_for_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        assert partition_for_rank(list("abcde"), even_divisible=even) == expected[rank]
    shards = []
    for rank in (0, 1):  # shuffled: seeded, the same order on every process, every entry in one shard
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        shards.append(partition_for_rank(list("abcdef"), shuffle=True, seed=3))
    assert sorted(shards[0] + shards[1]) == list("abcdef") and len(shards[0]) == len(shards[1]) == 3


def test_partition_for_rank_needs_an_entry_per_process(monkeypatch):
    import torch.distributed as dist

    from hybridmim_components.workflow.data import partition_for_rank

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    with pytest.raises(ValueError, match=r"validation list has 2 entries for 4 processes"):
        partition_for_rank(["a", "b"], what="validation list")
