"""Datasets from folders, CSVs and names; class-disjoint splits; the m-per-class sampler."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, TINY, TINY_ARGS, make_image_folder, not_an_image, one_line_error, snapshot
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


# --- bad data is one line, and no run directory


def csv_file(tmp_path: Path, text: str) -> str:
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (tmp_path / "images" / "list.csv").write_text(text)
    return str(tmp_path / "images" / "list.csv")


def empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def unreadable_folder(tmp_path: Path) -> str:
    for c in range(2):
        (tmp_path / "bad" / f"c{c}").mkdir(parents=True)
        not_an_image(tmp_path / "bad" / f"c{c}" / "0.jpg")
    return str(tmp_path / "bad")


BAD_DATA = {
    "missing folder": (lambda t: ["--data", f"{t}/nowhere/"], 1, "data '{t}/nowhere/' does not exist; give a folder of <class>/<image>, a .csv file or a dataset name"),
    "empty folder": (lambda t: ["--data", empty_folder(t)], 1, "no images found in '{t}/empty'; expected <class>/<image> folders"),
    "CSV without the columns": (lambda t: ["--data", csv_file(t, "file,label\nclass_00/0.png,a\n")], 1, "needs a header with the columns path,label"),
    "CSV naming a missing image": (lambda t: ["--data", csv_file(t, "path,label\nclass_00/0.png,a\nnope.png,a\n")], 1, "line 3: image 'nope.png' does not exist"),
    "too few classes for a batch": (lambda t: ["--data", str(make_image_folder(t / "two", classes=2))], 1, "needs 4 classes with 2+ images; the data has 2: lower --batch-size or raise --m-per-class"),
    "no readable image": (lambda t: ["--data", unreadable_folder(t)], 1, "none of the 2 images of 'bad' can be read: {t}/bad/c0/0.jpg (not an image), {t}/bad/c1/0.jpg (not an image)"),
    "unknown dataset": (lambda t: ["--data", "digit"], 2, "unknown dataset 'digit'; did you mean 'digits'?"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_and_no_run_directory(case, mltk_main, tmp_path):
    args, code, message = BAD_DATA[case]
    exit_code, out, err = mltk_main("run", *TINY_ARGS, "--epochs", "1", "--out", tmp_path / "run", *args(tmp_path))
    assert exit_code == code and out.strip() == ""
    assert err.startswith("error: ") and message.format(t=tmp_path) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# --- CSV lists: an open quote, paths outside the CSV's folder, bounded lines


def plugins_data_csv(folder: Path, body: str, name: str = "list.csv") -> Path:
    path = folder / name
    path.write_text("path,label\n" + body)
    return path


def test_an_unclosed_quote_names_its_line_and_not_the_file(image_folder):
    from mltk.data import load_data

    rows = "".join(f"class_00/{i % 4}.png,SECRET{i}\n" for i in range(200))
    csv_file = plugins_data_csv(image_folder, f'class_00/0.png,a\n"class_00/1.png,a\n{rows}')
    with pytest.raises(MltkError) as caught:
        load_data(str(csv_file))
    message = str(caught.value)
    assert "line 3: a quoted field runs on to line 203; is a closing quote missing?" in message
    assert "SECRET" not in message and len(message) < 200


def test_an_unclosed_quote_in_a_large_file_stops_at_csv_field_limit(image_folder):
    from mltk.data import load_data

    csv_file = plugins_data_csv(image_folder, '"class_00/1.png,a\n' + "class_00/0.png,SECRET\n" * 20000)
    with pytest.raises(MltkError, match=r"line 2: a quoted field runs on to line \d+; is a closing quote missing\?$") as caught:
        load_data(str(csv_file))
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize("rel", ["../outside.png", "class_00/../../outside.png", "ABSOLUTE", ".."])
def test_csv_paths_must_stay_in_the_csv_folder(tmp_path, mltk_main, rel):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "outside.png").write_bytes((folder / "class_00" / "0.png").read_bytes())
    rel = str(tmp_path / "outside.png") if rel == "ABSOLUTE" else rel
    csv_file = plugins_data_csv(folder, f"class_00/0.png,a\nclass_01/0.png,b\n{rel},a\n")
    with pytest.raises(MltkError, match=r"line 4: the path '.*'(\.\.\.)? leaves the CSV's folder; paths are relative to it"):
        load_data(str(csv_file))
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--data", csv_file, "--out", tmp_path / "run", "--backbone", TINY["backbone"], "--epochs", "0"))
    assert "line 4: the path" in line and "leaves the CSV's folder" in line
    assert snapshot(tmp_path) == before


def test_a_link_inside_the_csv_folder_is_followed(tmp_path):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=1, per_class=1)
    (folder / "linked").symlink_to(elsewhere / "class_00")
    data = load_data(str(plugins_data_csv(folder, "class_00/0.png,a\n./linked/0.png,b\n")))
    assert data.sources[1] == (elsewhere / "class_00" / "0.png").resolve()


@pytest.mark.parametrize(
    "body, message",
    [
        ("class_00/0.png,a\nclass_00/\x00.png,a\n", r"line 3: the path 'class_00/\\x00.png' holds control characters"),
        ("class_00/0.png,a\nclass_00/1.png,b\x1b[31m\n", r"line 3: the label 'b\\x1b\[31m' holds control characters"),
        ("class_00/0.png,a\n" + "x" * 70000 + ",a\n", r"line 3: longer than 65536 bytes; expected path,label lines"),
        ("class_00/0.png,a\n" + "y" * 300 + ".png,a\n", r"line 3: image 'y{60}'\.\.\. cannot be opened \(File name too long\)"),
        ("class_00/0.png,a\n" + "z" * 200 + ".png,a\n", r"line 3: image 'z{60}'\.\.\. does not exist$"),
    ],
    ids=["nul-in-path", "ansi-in-label", "huge-line", "name-too-long", "long-missing-name"],
)
def test_csv_fields_are_bounded_and_quoted_short(image_folder, body, message):
    from mltk.data import load_data

    with pytest.raises(MltkError, match=message) as caught:
        load_data(str(plugins_data_csv(image_folder, body)))
    assert len(str(caught.value)) < 300


def test_a_csv_header_and_bom_and_column_order(image_folder):
    from mltk.data import load_data

    (image_folder / "bom.csv").write_bytes("\ufefflabel,extra,path\nb,1,class_01/0.png\n\na,2,class_00/0.png\n".encode())
    data = load_data(str(image_folder / "bom.csv"))
    assert data.classes == ["a", "b"] and data.labels == [1, 0]
    (image_folder / "empty.csv").write_text("")
    with pytest.raises(MltkError, match="needs a header with the columns path,label"):
        load_data(str(image_folder / "empty.csv"))
    (image_folder / "binary.csv").write_bytes(b"path,label\nclass_00/0.png,a\n\xff\xfe,b\n")
    with pytest.raises(MltkError, match="line 3: not a readable CSV"):
        load_data(str(image_folder / "binary.csv"))


# --- images over PIL's pixel limit (a few KB on disk, gigabytes decoded)


@pytest.fixture(scope="module")
def plugins_data_bomb(tmp_path_factory):
    """A 1-bit PNG of 10,000 x 10,000 pixels: 12 KB on disk, over PIL's warning limit, under its error limit."""
    from PIL import Image

    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)
    assert path.stat().st_size < 100_000 and Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    return path


def test_an_image_over_pils_limit_is_skipped_by_the_scan_with_a_reason(plugins_data_bomb, image_folder):
    from PIL import Image

    from mltk.data import check_image, drop_unreadable, load_data

    reason = f"too large: 10000 x 10000 pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS}"
    assert check_image(plugins_data_bomb) == reason
    (image_folder / "class_02" / "huge.png").write_bytes(plugins_data_bomb.read_bytes())
    kept, skipped = drop_unreadable(load_data(str(image_folder)))
    assert skipped == [(image_folder / "class_02" / "huge.png", reason)] and len(kept) == 32


def test_open_image_refuses_a_huge_image_before_decoding_it(plugins_data_bomb, monkeypatch):
    from PIL import Image, ImageFile

    from mltk.data import open_image

    def no_decoding(self):
        raise AssertionError("the huge image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(Image.DecompressionBombError, match="too large: 10000 x 10000 pixels"):
        open_image(plugins_data_bomb, "RGB")


def test_an_image_over_twice_the_limit_has_the_same_reason(tmp_path, monkeypatch):
    from PIL import Image

    from mltk.data import check_image

    Image.new("L", (50, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2,500 pixels: PIL refuses it while opening
    assert check_image(tmp_path / "big.png") == "too large: 2500 pixels, over PIL's limit of 1000"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit turned off: mltk follows
    assert check_image(tmp_path / "big.png") is None


def test_pils_raw_warning_is_not_printed(plugins_data_bomb):
    code = (
        "import sys; from mltk.data import check_image, open_image\n"
        f"print(check_image({str(plugins_data_bomb)!r}))\n"
        "try:\n"
        f"    open_image({str(plugins_data_bomb)!r}, 'RGB')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[1] == "DecompressionBombError"
