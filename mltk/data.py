"""Datasets (folder, CSV or registered name), class-disjoint splits, transforms and the m-per-class sampler."""

import csv
import os
import random
import re
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from PIL import Image, UnidentifiedImageError

from mltk.errors import MltkError, UsageError, first_line


class CroppedImage(str):
    """An image file read cut to ``box`` (left, top, right, bottom pixels; PIL's crop box): a path everywhere else.

    A ``str`` so that paths.txt, skipped_images.txt, an index and the file checks see the file; pickled
    with its box, for DataLoader workers.
    """

    box: tuple[int, int, int, int]

    def __new__(cls, path: str | Path, box: tuple[int, int, int, int]) -> "CroppedImage":
        self = super().__new__(cls, os.fspath(path))
        self.box = tuple(int(v) for v in box)
        return self

    def __reduce__(self):
        return CroppedImage, (str(self), self.box)

    def __repr__(self) -> str:
        return f"CroppedImage({str(self)!r}, box={self.box})"


Source = Union[str, Path, CroppedImage, Image.Image]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}
MAX_CSV_LINE = 65536  # bytes: a path and a label fit many times over; a file of one endless line does not fill memory
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# An image over PIL's pixel limit is refused by mltk itself (check_image, open_image), once and by
# name; PIL's own DecompressionBombWarning would only repeat it, raw, for every file and epoch.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass
class LabelledImages:
    """Images (paths or PIL images) with integer labels indexing ``classes``; without classes (an unlabelled gallery),
    ``classes`` is [] and every label -1.

    ``hints`` are settings a dataset suggests where the user gave none (digits are 8x8: 32 px is plenty).
    """

    sources: list[Source]
    labels: list[int]
    classes: list[str]
    name: str = ""
    hints: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sources)

    def subset(self, class_ids: list[int], name: str = "") -> "LabelledImages":
        """The images of some classes, relabelled 0..len(class_ids)-1."""
        new_id = {c: i for i, c in enumerate(class_ids)}
        keep = [i for i, y in enumerate(self.labels) if y in new_id]
        return LabelledImages(
            [self.sources[i] for i in keep],
            [new_id[self.labels[i]] for i in keep],
            [self.classes[c] for c in class_ids],
            name or self.name,
            self.hints,
        )

    def rows(self, keep: list[int]) -> "LabelledImages":
        """Some of the images, labels and classes unchanged."""
        return LabelledImages([self.sources[i] for i in keep], [self.labels[i] for i in keep], self.classes, self.name, self.hints)


def digits() -> LabelledImages:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) as greyscale images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype("uint8")) for img in bunch.images]
    return LabelledImages(images, [int(t) for t in bunch.target], [str(c) for c in range(10)], "digits", {"image_size": 32, "m_per_class": 16})


def image_folder(root: Path) -> LabelledImages:
    """``root/<class>/<image>``; files at the root are ignored."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    sources, labels, classes = [], [], []
    for class_dir in class_dirs:
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if files:
            labels += [len(classes)] * len(files)
            sources += files
            classes.append(class_dir.name)
    if not sources:
        raise MltkError(f"no images found in {str(root)!r}; expected <class>/<image> folders")
    return LabelledImages(sources, labels, classes, root.name)


def unlabelled_folder(root: Path) -> LabelledImages:
    """Every image file under ``root``, subfolders too, without classes (labels -1, classes []): a gallery to embed or
    index, not a set to train or evaluate on. Hidden files and folders (``.thumbnails``) are left out."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden(p.relative_to(root)))
    if not files:
        raise MltkError(f"no images found in {str(root)!r}")
    return LabelledImages(files, [-1] * len(files), [], root.name)


def _hidden(path: Path) -> bool:
    return any(part.startswith(".") for part in path.parts)


def _short(text: str, limit: int = 60) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters: a message never carries a file's contents."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank row of the CSV ``path``, read as UTF-8 a bounded line at a time.

    A row runs over several lines only inside quotes: that is a quote left open (it would swallow
    the rest of the file), so it is named by the line where it opens.
    """
    where = str(path)
    with path.open("rb") as f:
        read = 0

        def lines() -> Iterator[str]:
            nonlocal read
            while raw := f.readline(MAX_CSV_LINE + 1):
                read += 1
                if len(raw) > MAX_CSV_LINE:
                    raise MltkError(f"{where!r} line {read}: longer than {MAX_CSV_LINE} bytes; expected path,label lines")
                try:
                    yield raw.decode("utf-8-sig" if read == 1 else "utf-8")
                except UnicodeDecodeError:  # a binary file, or another encoding
                    raise MltkError(f"{where!r} line {read}: not a readable CSV (not UTF-8 text)") from None

        reader, start = csv.reader(lines()), 1
        try:
            for fields in reader:
                if reader.line_num > start:
                    raise MltkError(f"{where!r} line {start}: a quoted field runs on to line {reader.line_num}; is a closing quote missing?")
                if fields:
                    yield start, fields
                start = reader.line_num + 1
        except csv.Error as exc:  # past csv's field size limit: a quote left open over many lines
            problem = f"a quoted field runs on to line {read}; is a closing quote missing?" if read > start else f"not a readable CSV ({exc})"
            raise MltkError(f"{where!r} line {start}: {problem}") from None


def csv_image(path: Path, line: int, rel: str) -> Path:
    """The image a CSV row names: a relative path that stays inside the CSV's folder (links inside it are followed)."""
    where = f"{str(path)!r} line {line}"
    if _CONTROL.search(rel):
        raise MltkError(f"{where}: the path {_short(rel)} holds control characters")
    return image_inside(path.parent, rel, where, "the CSV's folder", name_folder=False).resolve()


def image_inside(base: Path, rel: str, where: str, folder: str, name_folder: bool = True) -> Path:
    """The image file ``rel`` names in a listing (``where``: its file and line): a relative path that stays inside
    ``base`` (``folder``: how messages name it, also when the file is missing with ``name_folder``); links inside it are followed."""
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == os.pardir:
        raise MltkError(f"{where}: the path {_short(rel)} leaves {folder}; paths are relative to it, inside it")
    full = base / rel
    try:
        found = full.is_file()
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise MltkError(f"{where}: image {_short(rel)} cannot be opened ({exc.strerror or exc})") from None
    if not found:
        if full.is_dir():
            raise MltkError(f"{where}: {_short(rel)} is a folder, not an image file")
        raise MltkError(f"{where}: image {_short(rel)} does not exist" + (f" in {folder}" if name_folder else ""))
    return full


def csv_list(path: Path) -> LabelledImages:
    """A CSV with columns ``path,label``; paths relative to the CSV's folder, and inside it."""
    rows, columns = [], None
    for line, fields in csv_rows(path):
        if columns is None:
            if not {"path", "label"} <= set(fields):
                raise MltkError(f"{str(path)!r} needs a header with the columns path,label (has {_short(','.join(fields))})")
            columns = fields.index("path"), fields.index("label")
            continue
        rel, label = (fields[i] if i < len(fields) else "" for i in columns)
        if not rel or not label:
            raise MltkError(f"{str(path)!r} line {line}: needs a path and a label, got {_short(rel)},{_short(label)}")
        if _CONTROL.search(label):
            raise MltkError(f"{str(path)!r} line {line}: the label {_short(label)} holds control characters")
        rows.append((line, rel, label))
    if columns is None:
        raise MltkError(f"{str(path)!r} needs a header with the columns path,label (it is empty)")
    sources = [csv_image(path, line, rel) for line, rel, _ in rows]
    if not sources:
        raise MltkError(f"{str(path)!r} lists no images")
    classes = sorted({label for _, _, label in rows})
    class_id = {c: i for i, c in enumerate(classes)}
    return LabelledImages(sources, [class_id[label] for _, _, label in rows], classes, path.stem)


SPLITS = ("train", "test", "query", "gallery")  # what a dataset spec may name after its root
FLAGS = ("crop",)  # options a dataset spec may turn on, each passed to the dataset as name=True


def load_data(spec: str, split: str = "train") -> LabelledImages:
    """DATA as the CLI takes it: a folder, a CSV file, a dataset name, or NAME:ROOT[:SPLIT][:crop] (docs/benchmarks.md).

    ``split`` is the one a dataset gets when the spec names none: train for ``mltk run``, test for
    ``mltk evaluate``. A test split of query and gallery images (In-Shop) comes back as one set.
    """
    sets = load_sets(spec, split)
    return sets["data"] if "data" in sets else merge(sets["query"], sets["gallery"])


def load_test_data(spec: str) -> dict[str, LabelledImages]:
    """``mltk evaluate --data``: ``{"data": images}`` of the test split, or ``{"query": ..., "gallery": ...}``
    for a dataset whose test protocol is queries against a gallery (In-Shop)."""
    return load_sets(spec, "test")


def load_sets(spec: str, split: str) -> dict[str, LabelledImages]:
    """``{"data": images}`` of a folder, a CSV or a dataset; a dataset may give ``{"query": ..., "gallery": ...}``."""
    path = Path(spec)
    if path.is_dir():
        return {"data": image_folder(path)}
    if path.suffix.lower() == ".csv" and path.is_file():
        return {"data": csv_list(path)}
    if path.exists():
        raise MltkError(f"data {spec!r} is neither a folder of <class>/<image> nor a .csv file")
    from mltk import registry

    name, root, options = dataset_spec(spec)
    if not registry.NAME.fullmatch(name) or root is None and ("/" in spec or path.suffix):
        raise MltkError(f"data {spec!r} does not exist; give a folder of <class>/<image>, a .csv file or a dataset name")
    found = registry.create_dataset(name, **dataset_options(name, root, options, split))
    if isinstance(found, LabelledImages):
        return {"data": found}
    if isinstance(found, dict) and set(found) == {"query", "gallery"}:
        return found
    raise MltkError(f"dataset {name!r} gave a {type(found).__name__}, not images (LabelledImages, or a query and a gallery)")


def dataset_spec(spec: str) -> tuple[str, str | None, list[str]]:
    """``NAME:ROOT[:SPLIT][:crop]`` as (name, root or None, options): only a known split or flag at the end is an
    option, so a root holding a colon stays whole."""
    name, colon, rest = spec.partition(":")
    if not colon:
        return spec, None, []
    parts, options = rest.split(":"), []
    while len(parts) > 1 and parts[-1] in SPLITS + FLAGS:
        options.insert(0, parts.pop())
    return name, ":".join(parts), options


def dataset_options(name: str, root: str | None, options: list[str], split: str) -> dict:
    """The keyword arguments of dataset ``name``'s builder: its ``root``, ``split`` and flags, each checked against
    the parameters the builder declares, so a spec it cannot take is one line, not a TypeError."""
    import inspect

    from mltk import registry

    params = inspect.signature(registry.get("datasets", name).factory).parameters
    kwargs: dict = {}
    if root is not None:
        if "root" not in params:
            raise UsageError(f"dataset {name!r} takes no folder; give just {name!r}")
        if not root:
            raise UsageError(f"dataset {name!r}: give its folder after the colon, {name}:ROOT")
        kwargs["root"] = root
    elif "root" in params and params["root"].default is inspect.Parameter.empty:
        raise UsageError(f"dataset {name!r} is read from its own folder: give {name}:ROOT (see docs/benchmarks.md)")
    splits = [o for o in options if o in SPLITS]
    if len(splits) > 1:
        raise UsageError(f"dataset {name!r}: name one split, not {' and '.join(splits)}")
    if "split" in params:
        kwargs["split"] = splits[0] if splits else split
    elif splits:
        raise UsageError(f"dataset {name!r} has no splits; drop ':{splits[0]}'")
    for flag in (o for o in options if o in FLAGS):
        if flag not in params:
            raise UsageError(f"dataset {name!r} has no ':{flag}' option")
        kwargs[flag] = True
    return kwargs


def merge(query: LabelledImages, gallery: LabelledImages) -> LabelledImages:
    """A query and a gallery set as one: the query images, then the gallery's, labelled over the union of class names (sorted)."""
    classes = sorted(set(query.classes) | set(gallery.classes))
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[query.classes[y]] for y in query.labels] + [index[gallery.classes[y]] for y in gallery.labels]
    return LabelledImages(list(query.sources) + list(gallery.sources), labels, classes, f"{query.name}+{gallery.name}", query.hints)


def select_classes(data: LabelledImages, patterns: list[str]) -> LabelledImages:
    """The classes whose names match any of the fnmatch ``patterns``."""
    import fnmatch

    keep = [i for i, name in enumerate(data.classes) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not keep:
        raise MltkError(f"no class of {data.name!r} matches {', '.join(patterns)}")
    return data.subset(keep)


def split_classes(data: LabelledImages, fraction: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """Hold out ``fraction`` of the classes (class-disjoint, the metric-learning protocol)."""
    order = list(range(len(data.classes)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(order)))
    if n_val >= len(order):
        raise MltkError(f"--val-classes {fraction} leaves no class to train on ({len(order)} classes)")
    return data.subset(sorted(order[n_val:]), data.name), data.subset(sorted(order[:n_val]), f"{data.name}-val")


def open_image(source: Source, mode: str) -> Image.Image:
    """An image in ``mode`` ('RGB' or 'L'): greyscale works with RGB backbones and the other way round.

    A file over PIL's pixel limit is refused from its header, before a byte of it is decoded.
    """
    if isinstance(source, Image.Image):
        return source.convert(mode)
    with Image.open(source) as image:
        reason = too_large(image)
        if reason:
            raise Image.DecompressionBombError(reason)
        if isinstance(source, CroppedImage):
            return image.crop(clipped(source.box, image.size)).convert(mode)
        return image.convert(mode)


def clipped(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` clipped to an image of ``size`` (annotated boxes may pass its edge by a pixel or two); a ValueError
    when nothing of it is inside."""
    width, height = size
    left, top, right, bottom = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if right <= left or bottom <= top:
        raise ValueError(f"crop box {box} lies outside the {width} x {height} image")
    return left, top, right, bottom


def too_large(image: Image.Image) -> str | None:
    """Why an opened image is too large to decode: over ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL only warns up to twice that)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit and width * height > limit:
        return f"too large: {width} x {height} pixels, over PIL's limit of {limit}"
    return None


def check_image(path: str | Path) -> str | None:
    """Why an image file cannot be read, or None if it can; a CroppedImage whose box misses the image (its size
    from the header) cannot either.

    Cheap enough to run over a dataset before training (5,000 photos: about 1.5 s on one core):
    a JPEG is decoded at 1/8 scale, which still reads every byte (~0.3 ms), and a PNG's chunk
    checksums are verified without inflating it (~0.1 ms; a full decode costs ~5 ms).
    """
    try:
        with Image.open(path) as image:
            reason = too_large(image)
            if reason:
                return reason
            if isinstance(path, CroppedImage):
                clipped(path.box, image.size)  # its ValueError is the reason, returned below
            if image.format == "PNG":
                image.verify()
            else:
                image.draft(None, (1, 1))
                image.load()
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as exc:  # over twice the limit: PIL refuses it while opening
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        return f"too large: {pixels[1] + ' pixels, ' if pixels else ''}over PIL's limit of {Image.MAX_IMAGE_PIXELS}"
    except Exception as exc:  # truncated or corrupt: PIL raises OSError, SyntaxError, ValueError ...
        return first_line(exc)
    return None


def drop_unreadable(data: LabelledImages) -> tuple[LabelledImages, list[tuple[Source, str]]]:
    """``data`` without the image files that do not decode, and those files with the reason; none left is an error."""
    files = [i for i, source in enumerate(data.sources) if not isinstance(source, Image.Image)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # PIL and file reads release the GIL
        reasons = dict(zip(files, pool.map(check_image, [data.sources[i] for i in files])))
    bad = [i for i in files if reasons[i]]
    if not bad:
        return data, []
    skipped = [(data.sources[i], reasons[i]) for i in bad]
    if len(bad) == len(data):
        raise MltkError(f"none of the {len(data)} images of {data.name!r} can be read: {describe_files(skipped)}")
    return data.rows(sorted(set(range(len(data))) - set(bad))), skipped


_LINE_BREAKS = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def write_skipped(path: Path, items: list[tuple[Source, str]], mode: str = "w") -> None:
    """skipped_images.txt: one ``path<TAB>reason`` line per image left out, so the user can fix or remove them.

    A tab or line break inside a file name is written as an escape (each line stays one image); other
    bytes are written as the file system gave them (a name that is not UTF-8 too).
    """
    text = "".join(f"{str(source).translate(_LINE_BREAKS)}\t{str(reason).translate(_LINE_BREAKS)}\n" for source, reason in items)
    with open(path, mode, encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


def readable(data: LabelledImages, skipped: list) -> LabelledImages:
    """``data`` without its unreadable files, which are added to ``skipped``."""
    data, bad = drop_unreadable(data)
    skipped += bad
    return data


def describe_files(items: list[tuple[Source, str]], limit: int = 3) -> str:
    """The first few ``(path, reason)`` pairs on one line, and how many more there are."""
    shown = ", ".join(f"{path} ({reason})" for path, reason in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


class ImageDataset:
    """A map-style dataset of ``(tensor, label, failed)`` for torch's DataLoader.

    ``failed`` is -1, or this index when its file could not be decoded (it passed the scan, or changed
    since): with ``stand_in`` another image of the same class takes its place, so a run never dies
    on one bad file; without it, or when no image of the class decodes, a blank image does and the
    caller drops or reports it.
    """

    def __init__(self, data: LabelledImages, transform, mode: str = "RGB", stand_in: bool = False):
        self.data, self.transform, self.mode, self.stand_in = data, transform, mode, stand_in
        self.decoded: list[Image.Image | None] | None = None  # every image decoded once (keep_decoded), None for a file that fails
        self.decoded_bytes = 0
        self.by_class: dict[int, list[int]] = {}
        for i, y in enumerate(data.labels):
            self.by_class.setdefault(y, []).append(i)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        for j in self.tries(i):
            if self.decoded is not None:
                image = self.decoded[j]
                if image is None:
                    continue
            else:
                try:
                    image = open_image(self.data.sources[j], self.mode)
                except Exception:  # a decoding error of one file; the transform's errors are bugs and propagate
                    continue
            return self.transform(image), self.data.labels[i], -1 if j == i else i
        return self.transform(Image.new(self.mode, (8, 8))), self.data.labels[i], i

    def keep_decoded(self, budget: int, threads: int = 2) -> int:
        """Decode every image once and keep it in memory (uint8, as decoded), when all of them take at most ``budget``
        bytes: the epochs then transform them without reading or decoding a file. Returns the bytes kept, 0 when the
        images would not fit (estimated from a sample of their headers, then counted while decoding) and stream instead."""
        if not len(self.data) or decoded_estimate(self.data, self.mode) > budget:
            return 0

        def decode(source):
            try:
                image = open_image(source, self.mode)
                image.load()
                return image
            except Exception:  # read again (and failed again) by __getitem__'s stand-in rule: the same outcome as streaming
                return None

        kept, total = [], 0
        with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes without the GIL
            for image in pool.map(decode, self.data.sources):
                kept.append(image)
                total += 0 if image is None else image.width * image.height * len(image.getbands())
                if total > budget:  # the sample misjudged the sizes: stream after all
                    return 0
        self.decoded, self.decoded_bytes = kept, total
        return total

    def tries(self, i: int) -> Iterator[int]:
        """``i``, then with ``stand_in`` the other images of its class, in order after it."""
        yield i
        if self.stand_in:
            same = self.by_class[self.data.labels[i]]
            k = same.index(i)
            yield from same[k + 1 :] + same[:k]


def decoded_estimate(data: LabelledImages, mode: str, sample: int = 32, seed: int = 0) -> int:
    """Bytes the images take decoded in ``mode``, estimated from the headers of a seeded sample of them."""
    rng = random.Random(seed)
    picked = rng.sample(range(len(data)), min(sample, len(data)))
    sizes = []
    for i in picked:
        source = data.sources[i]
        try:
            if isinstance(source, Image.Image):
                width, height = source.size
            elif isinstance(source, CroppedImage):
                width, height = source.box[2] - source.box[0], source.box[3] - source.box[1]
            else:
                with Image.open(source) as image:
                    width, height = image.size
        except Exception:
            continue
        sizes.append(width * height * len(mode))
    return int(sum(sizes) / len(sizes) * len(data)) if sizes else 0


def data_config(model, image_size: int | None) -> dict:
    """timm's preprocessing for ``model``, at ``image_size`` when given, for as many channels as it takes."""
    from timm.data import resolve_data_config
    from torch import nn

    cfg = resolve_data_config({}, model=model)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else cfg["input_size"][0]
    if channels == 1 and len(cfg["mean"]) == 3:  # a greyscale model (in_chans=1): one mean, one std
        cfg["mean"], cfg["std"] = (sum(cfg["mean"]) / 3,), (sum(cfg["std"]) / 3,)
    size = (image_size, image_size) if image_size is not None else cfg["input_size"][1:]
    cfg["input_size"] = (channels, *size)
    return cfg


def make_transform(cfg: dict, augment: bool, options: dict | None = None):
    """timm's transform: random resized crop, flip and colour jitter with ``augment``; else resize and centre crop.

    ``options`` go to timm's ``create_transform`` (scale, ratio, hflip, color_jitter, auto_augment, ...),
    except ``affine``: torchvision ``RandomAffine`` arguments (degrees, translate, shear, fill), applied first.
    """
    from timm.data import create_transform
    from torchvision import transforms

    if not augment:
        return create_transform(**cfg, is_training=False)
    options = dict(options or {})
    affine = options.pop("affine", None)
    transform = create_transform(**cfg, is_training=True, **options)
    if affine:
        transform = transforms.Compose([transforms.RandomAffine(**affine), *transform.transforms])
    return transform


class MPerClassSampler:
    """Batches of ``batch_size // m`` classes with ``m`` images each, reshuffled per epoch from (seed, epoch).

    Each image is used once per epoch (a class whose count is not a multiple of m repeats a few);
    classes with one image have no positive pair and are left out. With ``num_replicas > 1`` each
    rank takes every num_replicas-th batch, so no image is seen twice in an epoch across ranks.
    """

    def __init__(self, labels: list[int], m: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0):
        self.m, self.batch_size, self.seed = m, batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        self.by_class = {y: idx for y, idx in by_class.items() if len(idx) > 1}
        self.left_out = sorted(set(by_class) - set(self.by_class))
        self.label_of = {i: y for y, idx in self.by_class.items() for i in idx}
        self.classes_per_batch = batch_size // m
        if len(self.by_class) < self.classes_per_batch:
            raise MltkError(
                f"a batch of {batch_size} with {m} per class needs {self.classes_per_batch} classes with 2+ images; "
                f"the data has {len(self.by_class)}: lower --batch-size or raise --m-per-class"
            )
        self.batches_per_epoch = max(1, len(self.label_of) // batch_size // num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(self.seed * 100_003 + self.epoch)
        chunks: list[list[int]] = []  # each class's shuffled images, dealt out m at a time
        for idx in self.by_class.values():
            idx = rng.sample(idx, len(idx))
            idx += rng.choices(idx, k=-len(idx) % self.m)
            chunks += [idx[i : i + self.m] for i in range(0, len(idx), self.m)]
        rng.shuffle(chunks)
        needed = self.batches_per_epoch * self.num_replicas
        batches, pending = [], deque(chunks)
        while len(batches) < needed:
            batch, used, skipped = [], set(), []
            while pending and len(used) < self.classes_per_batch:
                chunk = pending.popleft()
                label = self.label_of[chunk[0]]
                if label in used:
                    skipped.append(chunk)
                else:
                    batch += chunk
                    used.add(label)
            pending.extendleft(reversed(skipped))
            if len(used) < self.classes_per_batch:  # too few classes left: a fresh random batch
                classes = rng.sample(list(self.by_class), self.classes_per_batch)
                batch = [i for y in classes for i in rng.choices(self.by_class[y], k=self.m)]
            batches.append(batch)
        yield from batches[self.rank :: self.num_replicas]
