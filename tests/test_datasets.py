"""The benchmarks (cub200, cars196, sop, inshop) read from tiny copies of their official layouts: the papers'
splits, class names, bounding-box crops, the split each command takes, and one-line errors for bad roots and files."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY, one_line_error
from mltk import evaluate as ev
from mltk import registry
from mltk.data import CroppedImage, load_data, load_test_data, open_image
from mltk.errors import MltkError, UsageError

RUN_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
EVAL_ARGS = ["--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "--no-report", "--metrics", "map_at_r", "--save-embeddings"]


def jpeg(path: Path, size: tuple[int, int], seed: int) -> None:
    """A small noisy JPEG of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


# -- The official layouts, in miniature: the real files and columns, a few classes on each side of the split.

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross", 3: "003.Sooty_Albatross", 100: "100.Brown_Pelican",
               101: "101.White_Pelican", 102: "102.Western_Wood_Pewee", 199: "199.Winter_Wren", 200: "200.Common_Yellowthroat"}


@pytest.fixture
def cub(tmp_path) -> Path:
    """CUB_200_2011/: classes.txt (all 200), images.txt, image_class_labels.txt, bounding_boxes.txt, images/; 2 images of 8 classes."""
    root = tmp_path / "CUB_200_2011"
    root.mkdir()
    names = {c: CUB_CLASSES.get(c, f"{c:03d}.Bird_{c}") for c in range(1, 201)}
    (root / "classes.txt").write_text("".join(f"{c} {n}\n" for c, n in names.items()))
    images, labels, boxes = [], [], []
    for i, c in enumerate([c for c in CUB_CLASSES for _ in range(2)], 1):
        rel = f"{names[c]}/{names[c][4:]}_{i:04d}_{1000 + i}.jpg"
        jpeg(root / "images" / rel, (40 + i, 30), i)
        images.append(f"{i} {rel}\n")
        labels.append(f"{i} {c}\n")
        boxes.append(f"{i} {i}.0 2.0 {10 + i}.0 12.0\n")  # x y width height
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(labels))
    (root / "bounding_boxes.txt").write_text("".join(boxes))
    return root


CARS = [1, 2, 3, 98, 99, 100, 150, 196]  # each class: one image in cars_train/, one in cars_test/
CAR_NAMES = [f"Make {c} Model Sedan 2012" for c in range(1, 197)]


def mat_struct(rows: list[dict]) -> np.ndarray:
    """A 1 x N MATLAB struct array, each field a 1x1 matrix or a char array, as the devkit stores them."""
    fields = list(rows[0])
    array = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        array[0, i] = tuple(np.array([v]) if isinstance(v, str) else np.array([[v]], dtype=np.uint16) for v in row.values())
    return array


def cell(names: list[str]) -> np.ndarray:
    array = np.empty((1, len(names)), dtype=object)
    array[0, :] = names
    return array


def car_box(i: int) -> dict:
    return {"bbox_x1": i, "bbox_y1": 3, "bbox_x2": i + 20, "bbox_y2": 18}  # 20 x 15


@pytest.fixture
def cars_devkit(tmp_path) -> Path:
    """cars_train/, cars_test/ and devkit/ (cars_meta.mat, cars_train_annos.mat, cars_test_annos.mat with classes)."""
    from scipy.io import savemat

    root = tmp_path / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": cell(CAR_NAMES)})
    for part, offset in (("train", 0), ("test", 50)):
        rows = []
        for i, c in enumerate(CARS, 1):
            fname = f"{i:05d}.jpg"
            jpeg(root / f"cars_{part}" / fname, (60, 40 + i), offset + i)
            rows.append({**car_box(i), "class": c, "fname": fname})
        savemat(root / "devkit" / f"cars_{part}_annos.mat", {"annotations": mat_struct(rows)})
    return root


@pytest.fixture
def cars_combined(tmp_path) -> Path:
    """cars_annos.mat (relative_im_path, boxes, class, test; class_names) and car_ims/."""
    from scipy.io import savemat

    root = tmp_path / "cars"
    rows = []
    for i, c in enumerate(CARS + CARS, 1):
        rel = f"car_ims/{i:06d}.jpg"
        jpeg(root / rel, (60, 40 + i), i)
        rows.append({"relative_im_path": rel, **car_box(i), "class": c, "test": int(i > len(CARS))})
    savemat(root / "cars_annos.mat", {"annotations": mat_struct(rows), "class_names": cell(CAR_NAMES)})
    return root


SOP_HEADER = "image_id class_id super_class_id path\n"


@pytest.fixture
def sop(tmp_path) -> Path:
    """Stanford_Online_Products/: Ebay_train.txt (classes 1-4), Ebay_test.txt (11319-11321), <category>_final/ images."""
    root = tmp_path / "Stanford_Online_Products"
    for split, classes in (("train", [1, 2, 3, 4]), ("test", [11319, 11320, 11321])):
        lines = [SOP_HEADER]
        for k, (c, n) in enumerate(((c, n) for c in classes for n in range(2)), 1):
            category, super_id = ("bicycle", 1) if c % 2 else ("chair", 4)
            rel = f"{category}_final/{c}{n:04d}_{n}.JPG"
            jpeg(root / rel, (24, 24), c * 10 + n)
            lines.append(f"{k} {c} {super_id} {rel}\n")
        (root / f"Ebay_{split}.txt").write_text("".join(lines))
    return root


@pytest.fixture
def inshop(tmp_path) -> Path:
    """list_eval_partition.txt (count, header, padded rows) and img/: items 1-4 train (2 images), 5-7 query (1) and gallery (2)."""
    root = tmp_path / "inshop"
    rows = []
    for item in range(1, 8):
        statuses = ["train"] * 2 if item <= 4 else ["query", "gallery", "gallery"]
        for n, status in enumerate(statuses, 1):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{n:02d}_1_front.jpg"
            jpeg(root / rel, (24, 32), item * 10 + n)
            rows.append(f"{rel:<60}id_{item:08d}       {status}\n")
    (root / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(rows))
    return root


# -- What each reads: splits, labels, class names.


def test_the_benchmarks_are_registered_datasets():
    assert {"cub200", "cars196", "sop", "inshop", "digits"} <= set(registry.list_datasets())


def test_cub200_splits_classes_1_to_100_from_101_to_200(cub):
    train, test = load_data(f"cub200:{cub}"), load_data(f"cub200:{cub}:test")
    assert train.classes == [CUB_CLASSES[c] for c in (1, 2, 3, 100)]
    assert test.classes == [CUB_CLASSES[c] for c in (101, 102, 199, 200)]
    assert train.labels == [0, 0, 1, 1, 2, 2, 3, 3] and len(test) == 8
    assert all(Path(s).parent.name == train.classes[y] and Path(s).is_file() for s, y in zip(train.sources, train.labels))
    assert load_data(f"cub200:{cub}:train").sources == train.sources


@pytest.mark.parametrize("layout", ["cars_devkit", "cars_combined"])
def test_cars196_splits_by_class_whichever_devkit_folder_an_image_is_in(layout, request):
    root = request.getfixturevalue(layout)
    train, test = load_data(f"cars196:{root}"), load_data(f"cars196:{root}:test")
    assert train.classes == [CAR_NAMES[c - 1] for c in (1, 2, 3, 98)]
    assert test.classes == [CAR_NAMES[c - 1] for c in (99, 100, 150, 196)]
    assert len(train) == len(test) == 8 and sorted(train.labels) == [0, 0, 1, 1, 2, 2, 3, 3]
    folders = {Path(s).parent.name for s in train.sources} | {Path(s).parent.name for s in test.sources}
    assert folders == ({"cars_train", "cars_test"} if layout == "cars_devkit" else {"car_ims"})
    if layout == "cars_devkit":  # the devkit's test images of a training class train, and the other way round
        assert {Path(s).parent.name for s in train.sources} == {Path(s).parent.name for s in test.sources} == {"cars_train", "cars_test"}


def test_sop_reads_ebay_train_and_test(sop):
    train, test = load_data(f"sop:{sop}"), load_data(f"sop:{sop}:test")
    assert train.classes == ["1", "2", "3", "4"] and test.classes == ["11319", "11320", "11321"]
    assert len(train) == 8 and len(test) == 6 and test.labels == [0, 0, 1, 1, 2, 2]
    assert Path(test.sources[0]) == sop / "bicycle_final" / "113190000_0.JPG"


def test_inshop_trains_on_train_and_tests_queries_against_the_gallery(inshop):
    train = load_data(f"inshop:{inshop}")
    assert train.classes == [f"id_{i:08d}" for i in (1, 2, 3, 4)] and len(train) == 8
    sets = load_test_data(f"inshop:{inshop}")
    assert sorted(sets) == ["gallery", "query"] and len(sets["query"]) == 3 and len(sets["gallery"]) == 6
    assert sets["query"].classes == sets["gallery"].classes == [f"id_{i:08d}" for i in (5, 6, 7)]
    assert len(load_data(f"inshop:{inshop}:gallery")) == 6 and len(load_data(f"inshop:{inshop}:query")) == 3
    merged = load_data(f"inshop:{inshop}:test")  # one set where one is wanted: the queries, then the gallery
    assert len(merged) == 9 and merged.classes == sets["query"].classes and merged.labels[:3] == [0, 1, 2]


# -- Crops: cut when the image is read, by workers too.


def test_crop_reads_the_box_of_cub200(cub):
    plain, cropped = load_data(f"cub200:{cub}"), load_data(f"cub200:{cub}:crop")
    assert list(map(str, cropped.sources)) == list(map(str, plain.sources)) and cropped.labels == plain.labels  # the same files
    assert open_image(plain.sources[0], "RGB").size == (41, 30)
    image_1 = cropped.sources[0]
    assert isinstance(image_1, CroppedImage) and image_1.box == (1, 2, 12, 14)  # x 1, y 2, width 11, height 12
    assert open_image(image_1, "RGB").size == (11, 12)
    assert open_image(load_data(f"cub200:{cub}:test:crop").sources[0], "L").size == (19, 12)  # image 9: width 19


@pytest.mark.parametrize("layout", ["cars_devkit", "cars_combined"])
def test_crop_reads_the_box_of_cars196(layout, request):
    root = request.getfixturevalue(layout)
    for source in load_data(f"cars196:{root}:test:crop").sources:
        assert open_image(source, "RGB").size == (20, 15)
    again = pickle.loads(pickle.dumps(load_data(f"cars196:{root}:crop").sources))  # what a DataLoader worker gets
    assert all(isinstance(s, CroppedImage) and open_image(s, "RGB").size == (20, 15) for s in again)


def test_a_box_past_the_image_is_clipped_and_one_outside_it_fails_to_decode(tmp_path):
    jpeg(tmp_path / "a.jpg", (30, 20), 0)
    assert open_image(CroppedImage(tmp_path / "a.jpg", (25, 15, 40, 30)), "RGB").size == (5, 5)
    with pytest.raises(ValueError, match="outside"):  # ImageDataset treats it as an image that does not decode
        open_image(CroppedImage(tmp_path / "a.jpg", (35, 0, 40, 10)), "RGB")


# -- The split each command takes by default, and the spec in a YAML config.


def test_mltk_run_trains_on_the_train_split(cub, mltk_main, tmp_path):
    code, _, err = mltk_main("run", *RUN_ARGS, "--data", f"cub200:{cub}", "--out", tmp_path / "run")
    assert code == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["classes"] == [CUB_CLASSES[c] for c in (1, 2, 3, 100)]


def test_val_data_of_a_benchmark_is_its_test_classes(cub, mltk_main, tmp_path):
    spec = f"cub200:{cub}"
    code, _, err = mltk_main("run", *RUN_ARGS, "--data", spec, "--val-data", spec, "--out", tmp_path / "run")
    assert code == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["classes"] == [CUB_CLASSES[c] for c in (1, 2, 3, 100)]
    from mltk.evaluate import held_out_data
    from mltk.model import load

    held_out = held_out_data(load(tmp_path / "run", device="cpu"))  # what mltk evaluate RUN evaluates on
    assert held_out.classes == [CUB_CLASSES[c] for c in (101, 102, 199, 200)]


def test_a_yaml_config_takes_the_spec(cars_combined, mltk_main, tmp_path):
    config = tmp_path / "cars.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data": f"cars196:{cars_combined}:crop"}))
    code, _, err = mltk_main("run", "--config", config, "--out", tmp_path / "run")
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["classes"] == [CAR_NAMES[c - 1] for c in (1, 2, 3, 98)]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"] == f"cars196:{cars_combined}:crop"


def test_mltk_evaluate_takes_the_test_split(cub, mltk_main, tmp_path):
    code, _, err = mltk_main("evaluate", *EVAL_ARGS, "--data", f"cub200:{cub}", "--out", tmp_path / "e")
    assert code == 0, err
    folders = {Path(p).parent.name for p in (tmp_path / "e" / "paths.txt").read_text().splitlines()}
    assert folders == {CUB_CLASSES[c] for c in (101, 102, 199, 200)}


def test_mltk_evaluate_on_inshop_searches_the_gallery_for_the_queries(inshop, mltk_main, monkeypatch, tmp_path):
    seen, embed_and_score = {}, ev.embed_and_score

    def spy(model, settings, reranker, **inputs):
        seen.update(inputs)
        return embed_and_score(model, settings, reranker, **inputs)

    monkeypatch.setattr(ev, "embed_and_score", spy)
    code, _, err = mltk_main("evaluate", *EVAL_ARGS, "--data", f"inshop:{inshop}", "--out", tmp_path / "e")
    assert code == 0, err
    assert len(seen["query"]) == 3 and len(seen["gallery"]) == 6 and seen.get("data") is None
    assert len((tmp_path / "e" / "paths.txt").read_text().splitlines()) == 9
    assert "map@r" in json.loads((tmp_path / "e" / "metrics.json").read_text())


# -- One line for a wrong root, a missing file, a malformed line, a bad spec.


@pytest.mark.parametrize("name, expected", [
    ("cub200", "has no images.txt; give the CUB_200_2011 folder as unpacked from CUB_200_2011.tgz"),
    ("cars196", "has no devkit/cars_meta.mat (nor cars_annos.mat)"),
    ("sop", "has no Ebay_test.txt; give the Stanford_Online_Products folder"),
    ("inshop", "has no list_eval_partition.txt (nor Eval/list_eval_partition.txt)"),
])
def test_a_root_without_the_expected_file_is_one_line(name, expected, mltk_main, tmp_path):
    (tmp_path / "wrong").mkdir()
    line = one_line_error(mltk_main("evaluate", *EVAL_ARGS, "--data", f"{name}:{tmp_path / 'wrong'}", "--out", tmp_path / "e"), code=1)
    assert line.startswith(f"error: {name}: {tmp_path / 'wrong'} {expected}") and not (tmp_path / "e").exists()


def test_a_missing_label_file_is_named(cub):
    (cub / "image_class_labels.txt").unlink()
    with pytest.raises(MltkError, match=f"^cub200: {cub} has no image_class_labels.txt; give the CUB_200_2011 folder"):
        load_data(f"cub200:{cub}")


def rewrite(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    path.write_text("".join(lines))


@pytest.mark.parametrize("file, line, text, expected", [
    ("images.txt", 3, "3 a.jpg extra\n", "line 3: expected 'image_id path', got '3 a.jpg extra'"),
    ("images.txt", 2, "2 ../../outside.jpg\n", "line 2: the path '../../outside.jpg' leaves"),
    ("images.txt", 2, "2 /etc/passwd\n", "line 2: the path '/etc/passwd' leaves"),
    ("images.txt", 4, "2 x.jpg\n", "line 4: image_id 2 is given twice (first on line 2)"),
    ("images.txt", 5, "5 001.Black_footed_Albatross/missing.jpg\n", "line 5: image '001.Black_footed_Albatross/missing.jpg' does not exist"),
    ("image_class_labels.txt", 6, "6 two\n", "line 6: class_id 'two' is not a whole number"),
    ("image_class_labels.txt", 6, "6 201\n", "line 6: class 201 is not in classes.txt"),
    ("classes.txt", 7, "7\n", "line 7: expected 'class_id class_name', got '7'"),
    ("bounding_boxes.txt", 2, "2 1.0 2.0 nan 4.0\n", "line 2: width 'nan' is not a number >= 0"),
    ("bounding_boxes.txt", 2, "2 1.0 2.0 0.0 4.0\n", "line 2: the box of image 2 is empty"),
    ("bounding_boxes.txt", 2, "2 1e308 0 1e308 10\n", "line 2: the box of image 2 ends past any image (x + width inf, y + height 10)"),
    ("bounding_boxes.txt", 2, "2 0 1e300 10 1\n", "line 2: the box of image 2 ends past any image (x + width 10, y + height 1e+300)"),
    ("images.txt", 5, "5 001.Black_footed_Albatross\n", "line 5: '001.Black_footed_Albatross' is a folder, not an image file"),
])
def test_a_malformed_cub_line_names_the_file_and_line(cub, file, line, text, expected):
    rewrite(cub / file, line, text)
    with pytest.raises(MltkError) as raised:
        load_data(f"cub200:{cub}:crop")
    assert str(raised.value).startswith(f"{str(cub / file)!r} {expected}")


@pytest.mark.parametrize("file, line, text, expected", [
    ("Ebay_train.txt", 1, "image_id class path\n", "line 1: expected the header 'image_id class_id super_class_id path'"),
    ("Ebay_train.txt", 3, "2 x 1 bicycle_final/10000_0.JPG\n", "line 3: class_id 'x' is not a whole number"),
    ("Ebay_train.txt", 3, "2 1 1\n", "line 3: expected 'image_id class_id super_class_id path', got '2 1 1'"),
])
def test_a_malformed_sop_line_names_the_file_and_line(sop, file, line, text, expected):
    rewrite(sop / file, line, text)
    with pytest.raises(MltkError) as raised:
        load_data(f"sop:{sop}")
    assert str(raised.value).startswith(f"{str(sop / file)!r} {expected}")


@pytest.mark.parametrize("line, text, expected", [
    (1, "20\n", "line 1: says 20 images, the file lists 17"),
    (2, "image_name item_id\n", "line 2: expected the header 'image_name item_id evaluation_status', got 'image_name item_id'"),
    (5, "img/WOMEN/Dresses/id_00000002/01_1_front.jpg id_00000002 val\n", "line 5: evaluation_status 'val' is not train, query or gallery"),
])
def test_a_malformed_inshop_line_names_the_file_and_line(inshop, line, text, expected, mltk_main, tmp_path):
    rewrite(inshop / "list_eval_partition.txt", line, text)
    error = one_line_error(mltk_main("evaluate", *EVAL_ARGS, "--data", f"inshop:{inshop}", "--out", tmp_path / "e"), code=1)
    assert error == f"error: {str(inshop / 'list_eval_partition.txt')!r} {expected}"


def test_a_bad_mat_file_names_the_file_and_annotation(cars_devkit, cars_combined):
    from scipy.io import loadmat, savemat

    annos = cars_devkit / "devkit" / "cars_test_annos.mat"
    rows = loadmat(annos)["annotations"]
    rows["class"][0, 1] = np.array([[197]], dtype=np.uint16)
    savemat(annos, {"annotations": rows})
    with pytest.raises(MltkError, match=f"^{str(annos)!r} annotation 2: class 197 is not one of the 196 in class_names$"):
        load_data(f"cars196:{cars_devkit}")
    unlabelled = [{k: v for k, v in zip(rows.dtype.names, r) if k != "class"} for r in rows[0]]
    array = np.zeros((1, len(unlabelled)), dtype=[(f, "O") for f in unlabelled[0]])
    for i, r in enumerate(unlabelled):
        array[0, i] = tuple(r.values())
    savemat(annos, {"annotations": array})  # the devkit's first test file: no classes
    with pytest.raises(MltkError, match="annotations lack the field class; this is the devkit's unlabelled test file: add cars_test_annos_withlabels.mat"):
        load_data(f"cars196:{cars_devkit}:test")
    (cars_combined / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(MltkError, match=f"^{str(cars_combined / 'cars_annos.mat')!r} is not a readable .mat file"):
        load_data(f"cars196:{cars_combined}")


def test_a_path_in_a_mat_file_stays_inside_the_root(cars_combined):
    from scipy.io import loadmat, savemat

    mat = loadmat(cars_combined / "cars_annos.mat")
    mat["annotations"]["relative_im_path"][0, 2] = np.array(["../escape.jpg"])
    savemat(cars_combined / "cars_annos.mat", {"annotations": mat["annotations"], "class_names": mat["class_names"]})
    with pytest.raises(MltkError, match="annotation 3: the path '../escape.jpg' leaves"):
        load_data(f"cars196:{cars_combined}")


@pytest.mark.parametrize("spec, expected", [
    ("cub200", "dataset 'cub200' is read from its own folder: give cub200:ROOT (see docs/benchmarks.md)"),
    ("cub200:", "dataset 'cub200': give its folder after the colon, cub200:ROOT"),
    ("digits:/data", "dataset 'digits' takes no folder; give just 'digits'"),
    ("cub200:ROOT:query", "cub200 has no split 'query'; choose train or test"),
    ("cub200:ROOT:train:test", "dataset 'cub200': name one split, not train and test"),
    ("sop:ROOT:crop", "dataset 'sop' has no ':crop' option"),
    ("cub20:ROOT", "unknown dataset 'cub20'; did you mean 'cub200'?"),
])
def test_a_bad_spec_is_a_usage_error(spec, expected, cub):
    with pytest.raises(UsageError) as raised:
        load_data(spec.replace("ROOT", str(cub)))
    assert str(raised.value) == expected


def test_a_root_holding_a_colon_stays_whole(cub, tmp_path):
    odd = tmp_path / "birds:v1"
    cub.rename(odd)
    assert len(load_data(f"cub200:{odd}:test")) == 8


def rewrite_mat(path: Path, annotation: int, **fields) -> None:
    """Set ``fields`` of annotation ``annotation`` (from 1) of the .mat file ``path``, its other variables kept."""
    from scipy.io import loadmat, savemat

    mat = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
    for name, value in fields.items():
        mat["annotations"][name][0, annotation - 1] = np.array([value])
    savemat(path, mat)


# -- An image listed twice would be found as its own nearest neighbour: every reader refuses it, naming both entries.

DUPLICATES = {
    "cub": ("images.txt", lambda root: rewrite(root / "images.txt", 4, "4 001.Black_footed_Albatross/./Black_footed_Albatross_0002_1002.jpg\n"),
            "line 4 (image_id 4): image '001.Black_footed_Albatross/./Black_footed_Albatross_0002_100'... is listed already, as line 2 (image_id 2); list each image once"),
    "sop": ("Ebay_train.txt", lambda root: rewrite(root / "Ebay_train.txt", 3, "2 1 1 bicycle_final//10000_0.JPG\n"),
            "line 3 (image_id 2): image 'bicycle_final//10000_0.JPG' is listed already, as line 2 (image_id 1); list each image once"),
    "inshop": ("list_eval_partition.txt",  # a query image that is also in the gallery
               lambda root: rewrite(root / "list_eval_partition.txt", 12, "img/WOMEN/Dresses/id_00000005/01_1_front.jpg id_00000005 gallery\n"),
               "line 12: image 'img/WOMEN/Dresses/id_00000005/01_1_front.jpg' is listed already, as line 11; list each image once"),
    "cars_combined": ("cars_annos.mat", lambda root: rewrite_mat(root / "cars_annos.mat", 3, relative_im_path="car_ims/../car_ims/000001.jpg"),
                      "annotation 3: image 'car_ims/../car_ims/000001.jpg' is listed already, as annotation 1; list each image once"),
    "cars_devkit": ("devkit/cars_test_annos.mat", lambda root: rewrite_mat(root / "devkit" / "cars_test_annos.mat", 2, fname="00001.jpg"),
                    "annotation 2: image '00001.jpg' is listed already, as annotation 1; list each image once"),
}


@pytest.mark.parametrize("layout", DUPLICATES)
def test_an_image_listed_twice_is_refused_naming_both_entries(layout, request):
    root = request.getfixturevalue(layout)
    listing, spoil, expected = DUPLICATES[layout]
    spoil(root)
    name = {"cub": "cub200", "cars_combined": "cars196", "cars_devkit": "cars196"}.get(layout, layout)
    for split in ("train",) if layout == "sop" else ("train", "test"):  # one file of both splits: either is refused
        with pytest.raises(MltkError) as raised:
            load_data(f"{name}:{root}:{split}")
        assert str(raised.value) == f"{str(root / listing)!r} {expected}"


def test_evaluate_refuses_a_listing_with_an_image_twice_before_any_output(cub, mltk_main, tmp_path):
    rewrite(cub / "images.txt", 10, "10 101.White_Pelican/White_Pelican_0009_1009.jpg\n")  # image 9 again, as image 10
    line = one_line_error(mltk_main("evaluate", *EVAL_ARGS, "--data", f"cub200:{cub}", "--out", tmp_path / "e"), code=1)
    assert line.endswith("line 10 (image_id 10): image '101.White_Pelican/White_Pelican_0009_1009.jpg' is listed already, as line 9 (image_id 9); list each image once")
    assert not (tmp_path / "e").exists()


# -- A folder where a file is wanted is named a folder, not a missing file.


def test_a_folder_listed_as_an_image_or_given_as_a_file_is_called_a_folder(cub, cars_combined, cars_devkit, tmp_path):
    rewrite_mat(cars_combined / "cars_annos.mat", 3, relative_im_path="car_ims")
    with pytest.raises(MltkError, match=f"^{str(cars_combined / 'cars_annos.mat')!r} annotation 3: 'car_ims' is a folder, not an image file$"):
        load_data(f"cars196:{cars_combined}")
    (cub / "classes.txt").unlink()
    (cub / "classes.txt").mkdir()
    with pytest.raises(MltkError, match=f"^{str(cub / 'classes.txt')!r} is a folder, not a file"):
        load_data(f"cub200:{cub}")
    (cars_devkit / "devkit" / "cars_meta.mat").unlink()
    (cars_devkit / "devkit" / "cars_meta.mat").mkdir()
    with pytest.raises(MltkError, match=f"^{str(cars_devkit / 'devkit' / 'cars_meta.mat')!r} is a folder, not a file"):
        load_data(f"cars196:{cars_devkit}")
    with pytest.raises(MltkError, match=f"^sop: {tmp_path / 'nowhere'} does not exist; give the Stanford_Online_Products folder"):
        load_data(f"sop:{tmp_path / 'nowhere'}")
    with pytest.raises(MltkError, match=f"^sop: {cub / 'images.txt'} is not a folder"):
        load_data(f"sop:{cub / 'images.txt'}")


def test_a_combined_cars_annos_mat_without_classes_gets_the_combined_hint(cars_combined):
    from scipy.io import loadmat, savemat

    mat = loadmat(cars_combined / "cars_annos.mat")
    rows = [{k: v for k, v in zip(mat["annotations"].dtype.names, r) if k != "class"} for r in mat["annotations"][0]]
    array = np.zeros((1, len(rows)), dtype=[(f, "O") for f in rows[0]])
    for i, r in enumerate(rows):
        array[0, i] = tuple(r.values())
    savemat(cars_combined / "cars_annos.mat", {"annotations": array, "class_names": mat["class_names"]})
    with pytest.raises(MltkError) as raised:
        load_data(f"cars196:{cars_combined}")
    assert str(raised.value) == (f"{str(cars_combined / 'cars_annos.mat')!r}: annotations lack the field class; "
                                 "the combined release's cars_annos.mat gives each image of car_ims/ its box and class: fetch it again")


# -- A crop box outside its image: the scan leaves the image out, saying why.


def test_a_crop_box_outside_its_image_is_left_out_by_the_scan_with_the_reason(cub, mltk_main, tmp_path):
    rewrite(cub / "bounding_boxes.txt", 9, "9 60.0 2.0 10.0 12.0\n")  # image 9 is 49 x 30
    code, _, err = mltk_main("evaluate", *EVAL_ARGS, "--data", f"cub200:{cub}:crop", "--out", tmp_path / "e")
    assert code == 0, err
    reason = "crop box (60, 2, 70, 14) lies outside the 49 x 30 image"
    assert f"1 unreadable images were left out: {cub / 'images' / '101.White_Pelican' / 'White_Pelican_0009_1009.jpg'} ({reason})" in " ".join(err.split())
    path, why = (tmp_path / "e" / "skipped_images.txt").read_text().splitlines()[0].split("\t")
    assert why == reason and len((tmp_path / "e" / "paths.txt").read_text().splitlines()) == 7
