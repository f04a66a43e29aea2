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
    (image_folder / "folder.csv").write_text("path,label\nclass_00/0.png,a\nclass_01,b\n")
    with pytest.raises(MltkError, match="line 3: 'class_01' is a folder, not an image file$"):
        load_data(str(image_folder / "folder.csv"))


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


def spoil(folder, name: str, how: str):
    """Make ``folder/name`` unreadable: ``truncate`` it to half, or ``text`` (not an image at all)."""
    path = folder / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("this is not an image")
    return path


def test_check_image_finds_truncated_and_non_image_files(tmp_path):
    from PIL import Image

    from mltk.data import check_image

    pixels = Image.effect_noise((64, 48), 40).convert("RGB")
    for suffix in ("jpg", "png"):
        pixels.save(tmp_path / f"good.{suffix}")
        pixels.save(tmp_path / f"cut.{suffix}")
        assert check_image(tmp_path / f"good.{suffix}") is None
        assert "truncated" in check_image(spoil(tmp_path, f"cut.{suffix}", "truncate")).lower()
    assert check_image(spoil(tmp_path, "words.jpg", "text")) == "not an image"
    (tmp_path / "empty.png").write_bytes(b"")
    assert check_image(tmp_path / "empty.png") == "not an image"


def test_scan_leaves_out_unreadable_files_and_keeps_labels(image_folder):
    from mltk.data import drop_unreadable

    data = load_data(str(image_folder))
    bad = [spoil(image_folder, "class_01/2.png", "truncate"), spoil(image_folder, "class_05/0.png", "text")]
    kept, skipped = drop_unreadable(data)
    assert [path for path, _ in skipped] == bad and skipped[1][1] == "not an image"
    assert len(kept) == 30 and kept.classes == data.classes
    assert all(data.labels[data.sources.index(s)] == y for s, y in zip(kept.sources, kept.labels))


def test_scan_leaves_out_a_crop_box_outside_its_image_with_the_reason(image_folder):
    from mltk.data import CroppedImage, check_image, drop_unreadable

    data = load_data(str(image_folder))  # 24 x 24 images
    past_the_edge, outside = CroppedImage(data.sources[0], (20, 20, 40, 40)), CroppedImage(data.sources[1], (30, 0, 40, 10))
    data.sources[:2] = [past_the_edge, outside]
    kept, skipped = drop_unreadable(data)
    assert skipped == [(outside, "crop box (30, 0, 40, 10) lies outside the 24 x 24 image")]
    assert len(kept) == 31 and kept.sources[0] is past_the_edge  # clipped to the image when read
    assert check_image(outside) == skipped[0][1]  # what a file that fails later is reported with, too


def test_scan_with_nothing_readable_is_a_clear_error(tmp_path):
    from mltk.data import drop_unreadable

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        (tmp_path / f"c{c}" / "a.jpg").write_text("no")
    with pytest.raises(MltkError, match=r"none of the 2 images of '\w+' can be read: .*a.jpg \(not an image\)"):
        drop_unreadable(load_data(str(tmp_path)))


def test_a_file_that_breaks_later_is_replaced_by_another_of_its_class(image_folder):
    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from mltk.data import ImageDataset

    data = load_data(str(image_folder))
    i = data.sources.index(image_folder / "class_03" / "1.png")
    spoil(image_folder, "class_03/1.png", "text")
    image, label, failed = ImageDataset(data, to_tensor, stand_in=True)[i]
    stand_in = to_tensor(Image.open(image_folder / "class_03" / "2.png").convert("RGB"))
    assert label == 3 and failed == i and image.equal(stand_in)
    image, label, failed = ImageDataset(data, to_tensor)[i]  # no stand-in (evaluation): a blank, flagged
    assert label == 3 and failed == i and image.abs().sum() == 0
    assert ImageDataset(data, to_tensor, stand_in=True)[i + 1][2] == -1


def test_csv_that_is_not_text_or_lacks_a_label_names_the_line(image_folder):
    (image_folder / "binary.csv").write_bytes(b"path,label\n\xff\xfe\x00\x81\n")
    with pytest.raises(MltkError, match="not a readable CSV"):
        load_data(str(image_folder / "binary.csv"))
    (image_folder / "short.csv").write_text("path,label\nclass_00/0.png,a\nclass_00/1.png\n")
    with pytest.raises(MltkError, match="line 3: needs a path and a label"):
        load_data(str(image_folder / "short.csv"))
