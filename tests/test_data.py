"""Datasets from folders, CSVs and names; class-disjoint splits; the m-per-class sampler."""

from collections import Counter

import pytest

from mltk.data import MPerClassSampler, load_data, select_classes, split_classes
from mltk.errors import MltkError


def test_image_folder_reads_classes_and_ignores_root_files(image_folder):
    data = load_data(str(image_folder))
    assert data.classes == [f"class_{c:02d}" for c in range(8)]
    assert len(data) == 32 and Counter(data.labels) == {c: 4 for c in range(8)}
    assert all(p.suffix == ".png" for p in data.sources)


def test_csv_paths_are_relative_to_the_csv(image_folder):
    (image_folder / "list.csv").write_text("path,label\nclass_00/0.png,a\nclass_00/1.png,a\nclass_01/0.png,b\n")
    data = load_data(str(image_folder / "list.csv"))
    assert data.classes == ["a", "b"] and data.labels == [0, 0, 1]
    assert data.sources[2] == (image_folder / "class_01" / "0.png").resolve()


def test_csv_errors_name_the_problem(image_folder):
    (image_folder / "cols.csv").write_text("file,label\nclass_00/0.png,a\n")
    with pytest.raises(MltkError, match="needs a header with the columns path,label"):
        load_data(str(image_folder / "cols.csv"))
    (image_folder / "missing.csv").write_text("path,label\nclass_00/0.png,a\nnope.png,a\n")
    with pytest.raises(MltkError, match="line 3: image 'nope.png' does not exist"):
        load_data(str(image_folder / "missing.csv"))


def test_missing_data_and_unknown_dataset(tmp_path):
    with pytest.raises(MltkError, match="does not exist; give a folder"):
        load_data(str(tmp_path / "nothing_here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MltkError, match="no images found"):
        load_data(str(tmp_path / "empty"))
    with pytest.raises(MltkError, match="unknown dataset 'digit'; did you mean 'digits'"):
        load_data("digit")


def test_class_disjoint_split_and_selection(image_folder):
    data = load_data(str(image_folder))
    train, val = split_classes(data, 0.25, seed=1)
    assert len(val.classes) == 2 and len(train.classes) == 6
    assert not set(train.classes) & set(val.classes)
    assert split_classes(data, 0.25, seed=1)[1].classes == val.classes
    picked = select_classes(data, ["class_0[12]", "class_07"])
    assert picked.classes == ["class_01", "class_02", "class_07"] and picked.labels == [0] * 4 + [1] * 4 + [2] * 4


def test_sampler_batches_hold_m_images_of_distinct_classes():
    labels = [c for c in range(20) for _ in range(6)] + [99]  # class 99 has a single image
    sampler = MPerClassSampler(labels, m=3, batch_size=12, seed=0)
    assert sampler.left_out == [99]
    batches = list(sampler)
    assert len(batches) == len(sampler) == 120 // 12
    for batch in batches:
        counts = Counter(labels[i] for i in batch)
        assert len(batch) == 12 and set(counts.values()) == {3} and len(counts) == 4
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) == 1  # 6 images a class, m = 3: nothing repeats within an epoch


def test_sampler_is_reproducible_per_epoch_and_ranks_are_disjoint():
    labels = [c for c in range(16) for _ in range(8)]
    a, b = MPerClassSampler(labels, 4, 16, seed=5), MPerClassSampler(labels, 4, 16, seed=5)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    ranks = [MPerClassSampler(labels, 4, 16, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [{i for batch in r for i in batch} for r in ranks]
    assert len(list(ranks[0])) == len(list(ranks[1])) == 4 and not seen[0] & seen[1]


def test_too_few_classes_for_a_batch_is_a_clear_error():
    with pytest.raises(MltkError, match="needs 8 classes with 2\\+ images; the data has 3"):
        MPerClassSampler([0, 0, 1, 1, 2, 2], m=2, batch_size=16)
