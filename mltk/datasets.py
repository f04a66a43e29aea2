"""The standard metric-learning benchmarks, read from their folders as the official archives unpack, with the
papers' class-disjoint splits: CUB-200-2011, Cars196, Stanford Online Products and In-Shop (docs/benchmarks.md).

Every file is untrusted: each is read whole and checked before any image is used; a problem is one line
naming the file and the line (a .mat file: the annotation), and an image path stays inside the root and is listed once.
"""

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from mltk.data import _CONTROL, MAX_CSV_LINE, CroppedImage, LabelledImages, _short, image_inside
from mltk.errors import MltkError, UsageError, first_line

TRAIN_TEST = ("train", "test")
MAX_EDGE = 2**31 - 1  # pixels: PIL's image sides are C ints, so a box edge past this is past every image


# -- Checks shared by the readers: the root, the files in it, their lines, numbers and image paths.


def check_split(name: str, split: str, splits: tuple[str, ...] = TRAIN_TEST) -> None:
    if split not in splits:
        raise UsageError(f"{name} has no split {split!r}; choose {', '.join(splits[:-1])} or {splits[-1]}")


def folder(name: str, root: str | Path, hint: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise MltkError(f"{name}: {root} {'is not a folder' if root.exists() else 'does not exist'}; {hint}")
    return root


def need(name: str, root: Path, rel: str, hint: str) -> Path:
    """``root/rel``, a file the dataset cannot do without."""
    path = root / rel
    if not present(path):
        raise MltkError(f"{name}: {root} has no {rel}; {hint}")
    return path


def present(path: Path) -> bool:
    """Whether the file ``path`` is there; a folder of its name is an error, not a file missing."""
    if path.is_dir():
        raise MltkError(f"{str(path)!r} is a folder, not a file; give the dataset's folder as its archive unpacks")
    return path.is_file()


def lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of each non-blank line, read as UTF-8 a bounded line at a time."""
    where = str(path)
    try:
        f = path.open("rb")
    except OSError as exc:  # no permission, say
        raise MltkError(f"{where!r} cannot be read ({exc.strerror or exc})") from None
    with f:
        number = 0
        while raw := f.readline(MAX_CSV_LINE + 1):
            number += 1
            if len(raw) > MAX_CSV_LINE:
                raise MltkError(f"{where!r} line {number}: longer than {MAX_CSV_LINE} bytes")
            try:
                fields = raw.decode("utf-8-sig" if number == 1 else "utf-8").split()
            except UnicodeDecodeError:
                raise MltkError(f"{where!r} line {number}: not UTF-8 text") from None
            if any(_CONTROL.search(field) for field in fields):
                raise MltkError(f"{where!r} line {number}: holds control characters")
            if fields:
                yield number, fields


def expect(path: Path, line: int, fields: list[str], columns: str) -> list[str]:
    """``fields``, which must be as many as ``columns`` names."""
    if len(fields) != len(columns.split()):
        raise MltkError(f"{str(path)!r} line {line}: expected '{columns}', got {_short(' '.join(fields))}")
    return fields


def whole(text: str, where: str, what: str) -> int:
    """A whole number >= 1 (ids and classes count from 1 in every benchmark)."""
    try:
        value = int(text)
    except ValueError:
        raise MltkError(f"{where}: {what} {_short(text)} is not a whole number") from None
    if value < 1:
        raise MltkError(f"{where}: {what} {value} is not 1 or more")
    return value


def number(text: str, where: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise MltkError(f"{where}: {what} {_short(text)} is not a number >= 0")
    return value


def read_ids(path: Path, columns: str) -> dict[int, tuple[int, list[str]]]:
    """A file of ``id ...`` lines: id -> (line number, the other fields); each id once."""
    found: dict[int, tuple[int, list[str]]] = {}
    first = columns.split()[0]
    for line, fields in lines(path):
        key, *rest = expect(path, line, fields, columns)
        key = whole(key, f"{str(path)!r} line {line}", first)
        if key in found:
            raise MltkError(f"{str(path)!r} line {line}: {first} {key} is given twice (first on line {found[key][0]})")
        found[key] = line, rest
    if not found:
        raise MltkError(f"{str(path)!r} is empty; expected '{columns}' lines")
    return found


def listed_once(listing: Path, entries: Iterable[tuple[str, str]]) -> None:
    """Each image once in ``listing``, its path normalised (``a/./b.jpg`` is ``a/b.jpg``): an image listed twice is
    found as its own nearest neighbour, and retrieval looks better than it is. ``entries``: (the path as listed,
    the entry: 'line 7 (image_id 7)', 'annotation 3')."""
    first: dict[str, str] = {}
    for rel, entry in entries:
        key = os.path.normpath(rel)
        if key in first:
            raise MltkError(f"{str(listing)!r} {entry}: image {_short(rel)} is listed already, as {first[key]}; list each image once")
        first[key] = entry


def image(base: Path, rel: str, where: str) -> Path:
    """The image ``rel`` names: a relative path that stays inside ``base`` (links inside it are followed)."""
    return image_inside(base, rel, where, str(base))


def labelled(name: str, rows: list[tuple[Path, int]], class_names: dict[int, str], listing: Path, classes: str = "") -> LabelledImages:
    """``(source, class id)`` rows as LabelledImages over the classes they use, in id order; none is an error."""
    if not rows:
        raise MltkError(f"{name}: {listing} lists no image of this split{f' (classes {classes})' if classes else ''}")
    ids = sorted({c for _, c in rows})
    label = {c: i for i, c in enumerate(ids)}
    return LabelledImages([s for s, _ in rows], [label[c] for _, c in rows], [class_names[c] for c in ids], name)


# -- CUB-200-2011


CUB_HINT = "give the CUB_200_2011 folder as unpacked from CUB_200_2011.tgz"


def cub200(root: str | Path, split: str = "train", crop: bool = False) -> LabelledImages:
    """CUB-200-2011: classes 1-100 train, 101-200 test; with ``crop`` each image cut to its bounding box."""
    check_split("cub200", split)
    root = folder("cub200", root, CUB_HINT)
    names = ("images.txt", "image_class_labels.txt", "classes.txt") + (("bounding_boxes.txt",) if crop else ())
    files = {n: need("cub200", root, n, CUB_HINT) for n in names}
    classes = read_ids(files["classes.txt"], "class_id class_name")
    paths = read_ids(files["images.txt"], "image_id path")
    labels = read_ids(files["image_class_labels.txt"], "image_id class_id")
    boxes = read_ids(files["bounding_boxes.txt"], "image_id x y width height") if crop else {}
    for other, found in ((files["image_class_labels.txt"], labels), (files.get("bounding_boxes.txt"), boxes)):
        for key, (line, _) in found.items():
            if key not in paths:
                raise MltkError(f"{str(other)!r} line {line}: image {key} is not in images.txt")
    listed_once(files["images.txt"], ((rel, f"line {line} (image_id {key})") for key, (line, (rel,)) in paths.items()))
    rows = []
    for key, (line, (rel,)) in paths.items():
        where = f"{str(files['images.txt'])!r} line {line}"
        if key not in labels:
            raise MltkError(f"{where}: image {key} has no class in image_class_labels.txt")
        label_line, (text,) = labels[key]
        class_id = whole(text, f"{str(files['image_class_labels.txt'])!r} line {label_line}", "class_id")
        if class_id not in classes:
            raise MltkError(f"{str(files['image_class_labels.txt'])!r} line {label_line}: class {class_id} is not in classes.txt")
        box = cub_box(files["bounding_boxes.txt"], key, boxes, where) if crop else None
        if (class_id <= 100) == (split == "train"):
            path = image(root / "images", rel, where)
            rows.append((CroppedImage(path, box) if crop else path, class_id))
    return labelled(f"cub200-{split}", rows, {c: name for c, (_, (name,)) in classes.items()}, files["images.txt"], "1-100" if split == "train" else "101-200")


def cub_box(path: Path, key: int, boxes: dict, where: str) -> tuple[int, int, int, int]:
    """Image ``key``'s box as PIL's (left, top, right, bottom), from CUB's ``x y width height``."""
    if key not in boxes:
        raise MltkError(f"{where}: image {key} has no box in bounding_boxes.txt")
    line, fields = boxes[key]
    x, y, w, h = (number(v, f"{str(path)!r} line {line}", what) for v, what in zip(fields, ("x", "y", "width", "height")))
    if round(w) < 1 or round(h) < 1:
        raise MltkError(f"{str(path)!r} line {line}: the box of image {key} is empty ({w:g} x {h:g})")
    if max(x + w, y + h) > MAX_EDGE:  # an infinite sum too
        raise MltkError(f"{str(path)!r} line {line}: the box of image {key} ends past any image (x + width {x + w:g}, y + height {y + h:g})")
    return round(x), round(y), round(x + w), round(y + h)


# -- Cars196 (Stanford Cars): the devkit's .mat files, or the combined cars_annos.mat


CARS_HINT = "give the folder holding cars_train/, cars_test/ and devkit/ (from car_devkit.tgz), or the one holding cars_annos.mat and car_ims/"
BOX = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
UNLABELLED = "this is the devkit's unlabelled test file: add cars_test_annos_withlabels.mat beside it"


def cars196(root: str | Path, split: str = "train", crop: bool = False) -> LabelledImages:
    """Cars196: classes 1-98 train, 99-196 test, all their images (the devkit's train and test ones); with ``crop``
    each image cut to its bounding box."""
    check_split("cars196", split)
    root = folder("cars196", root, CARS_HINT)
    records, class_names, listing = cars_combined(root) if present(root / "cars_annos.mat") else cars_devkit(root)
    rows = [(CroppedImage(path, box) if crop else path, c) for path, c, box in records if (c <= 98) == (split == "train")]
    return labelled(f"cars196-{split}", rows, dict(enumerate(class_names, 1)), listing, "1-98" if split == "train" else "99-196")


def cars_combined(root: Path) -> tuple[list, list[str], Path]:
    """cars_annos.mat: every image (relative_im_path, under root), its box and class (its test flag is the devkit's
    split, not the papers'); class_names."""
    path = root / "cars_annos.mat"
    mat = read_mat(path)
    names = mat_names(path, mat)
    hint = "the combined release's cars_annos.mat gives each image of car_ims/ its box and class: fetch it again"
    found = [(mat_text(a["relative_im_path"], where, "relative_im_path"), where, c, box)
             for where, a, c, box in annotations(path, mat, ("relative_im_path", *BOX, "class"), len(names), hint)]
    listed_once(path, ((rel, f"annotation {i}") for i, (rel, *_) in enumerate(found, 1)))
    return [(image(root, rel, where), c, box) for rel, where, c, box in found], names, path


def cars_devkit(root: Path) -> tuple[list, list[str], Path]:
    """devkit/cars_meta.mat (class_names), cars_train_annos.mat and the labelled test annotations: fname under
    cars_train/ or cars_test/, box and class."""
    devkit = next((d for d in (root / "devkit", root) if present(d / "cars_meta.mat")), None)
    if devkit is None:
        raise MltkError(f"cars196: {root} has no devkit/cars_meta.mat (nor cars_annos.mat); {CARS_HINT}")
    names = mat_names(devkit / "cars_meta.mat", read_mat(devkit / "cars_meta.mat"))
    records = []
    # The devkit's first cars_test_annos.mat has no classes; cars_test_annos_withlabels.mat, released later, has.
    for images, choices in (("cars_train", ("cars_train_annos.mat",)), ("cars_test", ("cars_test_annos_withlabels.mat", "cars_test_annos.mat"))):
        path = next((devkit / n for n in choices if present(devkit / n)), None)
        if path is None:
            raise MltkError(f"cars196: {root} has no {(devkit / choices[-1]).relative_to(root)}; {CARS_HINT}")
        hint = UNLABELLED if path.name == "cars_test_annos.mat" else "fetch car_devkit.tgz again"
        found = [(mat_text(a["fname"], where, "fname"), where, c, box)
                 for where, a, c, box in annotations(path, read_mat(path), ("fname", *BOX, "class"), len(names), hint)]
        listed_once(path, ((fname, f"annotation {i}") for i, (fname, *_) in enumerate(found, 1)))
        records += [(image(root / images, fname, where), c, box) for fname, where, c, box in found]
    return records, names, devkit / "cars_train_annos.mat"


def read_mat(path: Path) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, squeeze_me=True)
    except Exception as exc:  # not a .mat file, a damaged one, or v7.3 (HDF5): scipy raises ValueError, TypeError, NotImplementedError ...
        raise MltkError(f"{str(path)!r} is not a readable .mat file ({first_line(exc)[:120]})") from None


def mat_names(path: Path, mat: dict) -> list[str]:
    """The ``class_names`` cell array: class 1 is the first."""
    value = mat.get("class_names")
    items = np.atleast_1d(value) if value is not None else np.array([])
    if not len(items) or not all(isinstance(v, str) and v.strip() and not _CONTROL.search(v) for v in items):
        raise MltkError(f"{str(path)!r} has no class_names (a cell array of names, one per class)")
    return [str(v) for v in items]


def annotations(path: Path, mat: dict, fields: tuple[str, ...], classes: int, hint: str) -> Iterator[tuple[str, dict, int, tuple]]:
    """(where, the annotation, its class, its box) of each entry of the struct array ``annotations``; the class in
    1..``classes`` and the box non-empty, all checked before the first is given. ``hint``: what to do when fields are missing."""
    value = mat.get("annotations")
    names = getattr(getattr(value, "dtype", None), "names", None)
    if names is None:
        raise MltkError(f"{str(path)!r} has no struct array 'annotations'")
    missing = [f for f in fields if f not in names]
    if missing:
        raise MltkError(f"{str(path)!r}: annotations lack the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; {hint}")
    found = []
    for i, record in enumerate(np.atleast_1d(value), 1):
        where = f"{str(path)!r} annotation {i}"
        entry = {f: record[f] for f in fields}
        c = mat_whole(entry["class"], where, "class")
        if c > classes:
            raise MltkError(f"{where}: class {c} is not one of the {classes} in class_names")
        x1, y1, x2, y2 = (mat_whole(entry[f], where, f, low=0, high=MAX_EDGE) for f in BOX)
        if x2 <= x1 or y2 <= y1:
            raise MltkError(f"{where}: the box ({x1}, {y1}, {x2}, {y2}) is empty")
        found.append((where, entry, c, (x1, y1, x2, y2)))
    if not found:
        raise MltkError(f"{str(path)!r} has no annotations")
    return iter(found)


def mat_whole(value, where: str, what: str, low: int = 1, high: float = math.inf) -> int:
    array = np.asarray(value)
    x = array.item() if array.size == 1 and array.dtype.kind in "iuf" else None
    if x is None or not math.isfinite(x) or x != int(x) or not low <= x <= high:
        within = f">= {low}" if high == math.inf else f"from {low} to {high}"
        raise MltkError(f"{where}: {what} must be a whole number {within}, got {_short(str(value))}")
    return int(x)


def mat_text(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        raise MltkError(f"{where}: {what} must be a file name, got {_short(str(value))}")
    return str(value)


# -- Stanford Online Products


SOP_HINT = "give the Stanford_Online_Products folder as unpacked from Stanford_Online_Products.zip"
SOP_COLUMNS = "image_id class_id super_class_id path"


def sop(root: str | Path, split: str = "train") -> LabelledImages:
    """Stanford Online Products: Ebay_train.txt (11,318 products) and Ebay_test.txt (11,316 others)."""
    check_split("sop", split)
    root = folder("sop", root, SOP_HINT)
    path = need("sop", root, f"Ebay_{split}.txt", SOP_HINT)
    rows, header = [], False
    for line, fields in lines(path):
        where = f"{str(path)!r} line {line}"
        if not header:
            if fields != SOP_COLUMNS.split():
                raise MltkError(f"{where}: expected the header '{SOP_COLUMNS}', got {_short(' '.join(fields))}")
            header = True
            continue
        image_id, class_id, super_id, rel = expect(path, line, fields, SOP_COLUMNS)
        whole(super_id, where, "super_class_id")
        rows.append((rel, where, whole(class_id, where, "class_id"), f"line {line} (image_id {whole(image_id, where, 'image_id')})"))
    if not rows:
        raise MltkError(f"{str(path)!r} lists no images; expected '{SOP_COLUMNS}' lines after the header")
    listed_once(path, ((rel, entry) for rel, _, _, entry in rows))
    sources = [(image(root, rel, where), c) for rel, where, c, _ in rows]
    return labelled(f"sop-{split}", sources, {c: str(c) for _, c in sources}, path)


# -- In-Shop Clothes Retrieval (DeepFashion)


INSHOP_HINT = "give the In-shop Clothes Retrieval Benchmark folder (Eval/list_eval_partition.txt, Img/img/), or one holding list_eval_partition.txt and img/"
INSHOP_COLUMNS = "image_name item_id evaluation_status"
INSHOP_SPLITS = ("train", "test", "query", "gallery")


def inshop(root: str | Path, split: str = "train") -> LabelledImages | dict[str, LabelledImages]:
    """In-Shop: train (3,997 items); test is query against gallery (3,985 other items), ``{"query": ..., "gallery": ...}``."""
    check_split("inshop", split, INSHOP_SPLITS)
    root = folder("inshop", root, INSHOP_HINT)
    path = next((root / rel for rel in ("list_eval_partition.txt", "Eval/list_eval_partition.txt") if present(root / rel)), None)
    if path is None:
        raise MltkError(f"inshop: {root} has no list_eval_partition.txt (nor Eval/list_eval_partition.txt); {INSHOP_HINT}")
    base = root / "Img" if not (root / "img").is_dir() and (root / "Img").is_dir() else root  # image names start img/
    rows: dict[str, list] = {"train": [], "query": [], "gallery": []}
    listed: list[tuple[str, str]] = []  # every image, whatever its status: one in the query and the gallery is one listed twice
    count = header = None
    for line, fields in lines(path):
        where = f"{str(path)!r} line {line}"
        if count is None:
            count = whole(expect(path, line, fields, "count")[0], where, "the count of images")
        elif header is None:
            if fields != INSHOP_COLUMNS.split():
                raise MltkError(f"{where}: expected the header '{INSHOP_COLUMNS}', got {_short(' '.join(fields))}")
            header = line
        else:
            rel, item, status = expect(path, line, fields, INSHOP_COLUMNS)
            if status not in rows:
                raise MltkError(f"{where}: evaluation_status {_short(status)} is not train, query or gallery")
            rows[status].append((rel, where, item))
            listed.append((rel, f"line {line}"))
    if header is None:
        raise MltkError(f"{str(path)!r} lacks its first two lines: the count of images, then '{INSHOP_COLUMNS}'")
    if count != len(listed):
        raise MltkError(f"{str(path)!r} line 1: says {count} images, the file lists {len(listed)}")
    listed_once(path, listed)

    def part(status: str) -> LabelledImages:
        items = sorted({item for _, _, item in rows[status]})
        ids = {item: i for i, item in enumerate(items, 1)}
        return labelled(f"inshop-{status}", [(image(base, rel, where), ids[item]) for rel, where, item in rows[status]], {i: n for n, i in ids.items()}, path)

    if split == "test":
        return {"query": part("query"), "gallery": part("gallery")}
    return part(split)
