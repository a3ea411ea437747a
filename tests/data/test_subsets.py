"""The MMEB subset table and data-set manifests (docs/method.md §4)."""

import json

import pytest

from g2e.data import subsets


def test_mmeb_table_matches_spec_counts():
    table = subsets.MMEB_SUBSETS
    assert len(table) == 36 and len({s.name for s in table}) == 36
    assert sum(s.group == "IND" for s in table) == 20
    assert sum(s.group == "OOD" for s in table) == 16
    counts = {t: sum(s.meta_task == t for s in table) for t in subsets.META_TASKS}
    assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert len(subsets.MMEB_TRAIN_SUBSETS) == 20 and "ImageNet_1K" in subsets.MMEB_TRAIN_SUBSETS


def test_classification_set_is_the_one_saha_filters_by():
    classification = {s.name for s in subsets.MMEB_SUBSETS if s.is_classification}
    assert classification == {
        "ImageNet-1K",
        "Place365",
        "N24News",
        "HatefulMemes",
        "VOC2007",
        "SUN397",
        "ImageNet-A",
        "ImageNet-R",
        "ObjectNet",
        "Country211",
    }


def test_train_spelling_resolves_to_eval_entry():
    info = subsets.subset_info("ImageNet_1K")
    assert (info.name, info.meta_task, info.group) == ("ImageNet-1K", "classification", "IND")
    assert subsets.train_name("ImageNet-1K") == "ImageNet_1K"
    assert subsets.subset_info("RefCOCO-Matching").group == "OOD"
    assert subsets.subset_info("MSCOCO").meta_task == "grounding"


def test_manifest_is_found_from_train_and_eval_dirs(tmp_path):
    infos = [
        subsets.SubsetInfo("Toy", "vqa", "OOD", False),
        subsets.SubsetInfo("ToyCls", "classification", "IND", True),
    ]
    subsets.write_manifest(str(tmp_path), infos)
    (tmp_path / "train").mkdir()
    for d in (tmp_path, tmp_path / "train"):
        assert subsets.subset_info("Toy", str(d)) == infos[0]
        assert subsets.subset_info("ToyCls", str(d)).is_classification
    # The real table still answers next to a manifest.
    assert subsets.subset_info("OK-VQA", str(tmp_path)).meta_task == "vqa"
    assert set(subsets.known_subsets(str(tmp_path))) == {"Toy", "ToyCls"}


def test_unknown_subset_names_it_and_the_manifest(tmp_path):
    subsets.write_manifest(str(tmp_path), [subsets.SubsetInfo("Toy", "vqa", "IND")])
    with pytest.raises(subsets.UnknownSubsetError, match=r"'Nope'.*subsets.json"):
        subsets.subset_info("Nope", str(tmp_path))
    with pytest.raises(subsets.UnknownSubsetError, match="Known subsets: .*ImageNet-1K"):
        subsets.subset_info("Nope")


def test_malformed_manifest_names_file_and_entry(tmp_path):
    path = tmp_path / subsets.MANIFEST_NAME
    path.write_text(
        json.dumps(
            {
                "subsets": [
                    {"name": "A", "meta_task": "vqa", "group": "IND"},
                    {"name": "B", "group": "IND"},
                ]
            }
        )
    )
    with pytest.raises(ValueError, match="entry 1 needs name, meta_task and group"):
        subsets.read_manifest(str(path))
    path.write_text(json.dumps({"subsets": [{"name": "A", "meta_task": "qa", "group": "IND"}]}))
    with pytest.raises(ValueError, match="meta_task 'qa'"):
        subsets.subset_info("A", str(tmp_path))
