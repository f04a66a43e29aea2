"""Editing an index directory instead of building it again: images added (``mltk index add``, ``mltk serve``'s
/enrol) and a class removed (``mltk index remove``, its DELETE /classes/NAME).

An edit never changes a file of the index. It writes the whole next version beside it and swaps it in at once
(``outputs.replace_folder``: one step on Linux), so a kill at any moment leaves the index as it was or as it is after.
Edits are serialised and readers never see half of one: the edit holds the index folder exclusively
(``outputs.locked_folder``) from reading the current version to the swap, and ``open_index_dir`` reads under the
shared lock. The slow part, embedding the new images, happens before the lock is taken.

How each faiss kind changes: adding appends the vectors to the index as it is (an IVF index keeps its trained cells;
add many more images than it was trained on and ``mltk index`` again balances them). Removing is real: faiss cannot
take rows out of the middle while keeping positions in line with paths.txt, so the index is rebuilt from the kept
rows of embeddings.npy (flat: the same vectors; ivf and ivfpq: the same trained cells and codebooks, refilled; hnsw:
the graph built again). The removed rows leave embeddings.npy, paths.txt and labels.npy, the class leaves
classes.json, and its uploaded images leave the folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mltk.embedding import EmbedSettings
from mltk.errors import MltkError, UsageError
from mltk.index import ENROLLED, IndexDir, check_index_replaceable, image_paths, load_model, open_index_dir
from mltk.knn import CHUNK, Progress, build
from mltk.outputs import locked_folder, replace_folder

NAME_BYTES = 255  # a class name is at most a folder name's length


@dataclass(frozen=True)
class Edit:
    """What an edit did, and the index after it."""

    added: int
    removed: int
    class_name: str | None
    new_class: bool
    count: int  # images in the index after the edit
    classes: int  # classes after the edit


def check_class_name(name: str, what: str = "class name") -> str:
    """A class name an edit may write: what a gallery's class folder could be called. Data, never markup: it is shown
    escaped; the rules only keep it a name (one line, a folder name's length, no path)."""
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{what} is empty; give the identity's name")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in name):
        raise UsageError(f"{what} {name!r} holds a control character or line break; a class name is one line of text")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UsageError(f"{what} {name!r} is a path, not a name: a class name holds no / or \\ and is not . or ..")
    if len(name.encode("utf-8", errors="surrogateescape")) > NAME_BYTES:
        raise UsageError(f"{what} is {len(name.encode('utf-8', errors='surrogateescape'))} bytes long; a class name is at most {NAME_BYTES}")
    return name


def add_images(
    index_dir: str | Path, data, *, class_name: str | None = None, settings: EmbedSettings = EmbedSettings(),
    progress: Progress | None = None, keep_copies: bool = False, model=None,
) -> tuple[Edit, list]:
    """Add the images of ``data`` (``mltk.data.LabelledImages``) to the index; returns what was done and the unreadable
    images left out.

    With ``class_name`` every image goes to that class (made if it is new); without it, each image to its own class of
    ``data``, matched to the index's classes by name. An index without classes takes images without classes only.
    ``keep_copies`` copies the images into the index directory (``enrolled/``, named by content): uploads, whose own
    files are temporary. ``model`` is the index's model when the caller has it loaded (``mltk serve``).
    """
    from mltk.data import readable
    from mltk.embedding import embed

    path = Path(index_dir)
    current = open_index_dir(path)
    if class_name is not None:
        check_class_name(class_name)
    _check_classes_fit(current, data, class_name)
    skipped: list = []
    data = readable(data, skipped)
    if not len(data):
        raise MltkError(f"none of the {len(skipped)} images to add can be read; the index is as it was")
    model = model if model is not None else load_model(current, settings.device)
    vectors = embed(model, data, settings.batch_size, settings.workers, progress=progress)  # before the lock: the slow part
    with locked_folder(path, exclusive=True):
        current = open_index_dir(path, locked=False)  # the version now: another edit may have come in meanwhile
        if current.meta.get("model") != model.fingerprint():
            raise MltkError(f"index directory {str(path)!r} was written again with another model while the images were embedded; add them again")
        _check_classes_fit(current, data, class_name)
        classes = list(current.classes)
        labels, new_class = _labels_for(classes, data, class_name)
        final = path.resolve()
        copies = [_enrolled_name(source) for source in data.sources] if keep_copies else []
        paths = [str(final / ENROLLED / name) for name in copies] if keep_copies else image_paths(data)
        keep = np.ones(len(current.paths), bool)
        with _next_version(path, current, keep, vectors) as (tmp, index):
            _link_enrolled(current, tmp, keep)
            for source, name in zip(data.sources, copies):
                shutil.copyfile(source, tmp / ENROLLED / name)
            _write_rows(tmp, current, keep, index, classes, paths, labels)
    edit = Edit(len(data), 0, class_name, new_class, index.ntotal, len(classes))
    return edit, skipped


def remove_class(index_dir: str | Path, name: str) -> Edit:
    """Take every image of class ``name`` out of the index: its rows, its listing, its label and its uploaded images."""
    path = Path(index_dir)
    with locked_folder(path, exclusive=True):
        current = open_index_dir(path, locked=False)
        if not current.classes:
            raise UsageError(f"index directory {str(path)!r} is a gallery without classes: there is no class {name!r} to remove")
        if name not in current.classes:
            raise UsageError(f"index directory {str(path)!r} has no class {name!r}; `mltk serve`'s /info or classes.json lists its classes")
        gone = current.classes.index(name)
        keep = current.labels != gone
        if not keep.any():
            raise UsageError(f"class {name!r} holds every image of the index, and an index holds at least one; delete the folder instead")
        classes = [c for c in current.classes if c != name]
        labels = current.labels[keep]
        labels = np.where(labels > gone, labels - 1, labels)
        with _next_version(path, current, keep, None) as (tmp, index):
            _link_enrolled(current, tmp, keep)
            _write_rows(tmp, current, keep, index, classes, [], labels, renumbered=True)
    return Edit(0, int((~keep).sum()), name, False, index.ntotal, len(classes))


# -- The next version: written whole beside the index, swapped in at the end.


def _check_classes_fit(current: IndexDir, data, class_name: str | None) -> None:
    labelled = bool(data.classes) or class_name is not None
    if current.classes and not labelled:
        raise UsageError(f"index directory {str(current.path)!r} has classes and these images have none; give --class NAME, the class they belong to")
    if not current.classes and labelled:
        raise UsageError(f"index directory {str(current.path)!r} is a gallery without classes; add images without classes (no --class, --unlabelled)")


def _labels_for(classes: list[str], data, class_name: str | None) -> tuple[np.ndarray, bool]:
    """Each new image's label in the index's classes, which gain the new ones (in place); whether a class was made."""
    if not classes:
        return np.full(len(data), -1, np.int64), False
    before = len(classes)
    names = [class_name] * len(data) if class_name is not None else [data.classes[y] for y in data.labels]
    for name in dict.fromkeys(names):
        check_class_name(name, "class")
        if name not in classes:
            classes.append(name)
    position = {c: i for i, c in enumerate(classes)}
    return np.asarray([position[n] for n in names], np.int64), len(classes) > before


def _enrolled_name(source) -> str:
    """An uploaded image's file name in enrolled/: its content's hash and its own suffix, never a name from a client."""
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:24]
    return digest + Path(source).suffix.lower()


@contextmanager
def _next_version(path: Path, current: IndexDir, keep: np.ndarray, added: np.ndarray | None):
    """The index's next version in a hidden sibling, with its vectors (the kept rows, then ``added``) and its faiss
    index: yields (folder, index); renamed over the index when the block ends, or removed if it fails."""
    shown = str(path)
    with replace_folder(path, f"index directory {shown!r}", "the index is as it was", recheck=lambda: check_index_replaceable(path.resolve(), shown)) as tmp:
        (tmp / ENROLLED).mkdir()
        vectors = _write_vectors(tmp, current, keep, added)
        yield tmp, _next_index(current, keep, vectors, added)


def _gallery_vectors(current: IndexDir) -> np.ndarray:
    if not (current.path / "embeddings.npy").is_file():
        raise MltkError(
            f"index directory {str(current.path)!r} has no embeddings.npy, and an edit keeps the gallery's vectors in it; "
            "write the index again with `mltk index`"
        )
    return np.load(current.path / "embeddings.npy", mmap_mode="r", allow_pickle=False)


def _write_vectors(tmp: Path, current: IndexDir, keep: np.ndarray, added: np.ndarray | None) -> np.ndarray:
    """embeddings.npy of the next version: the kept rows, then the added ones; returned as a memory map."""
    old = _gallery_vectors(current)
    rows = np.flatnonzero(keep)
    total = len(rows) + (0 if added is None else len(added))
    out = np.lib.format.open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float32, shape=(total, old.shape[1]))
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        out[start:start + len(chunk)] = old[chunk]
    if added is not None:
        out[len(rows):] = added
    out.flush()
    return out


def _next_index(current: IndexDir, keep: np.ndarray, vectors: np.ndarray, added: np.ndarray | None):
    """The faiss index of the next version: the current one with ``added`` appended, or refilled with the kept rows."""
    import faiss

    from mltk.knn import kind_of

    if keep.all() and added is not None:
        index = faiss.clone_index(current.index)
        for start in range(0, len(added), CHUNK):
            index.add(np.ascontiguousarray(added[start:start + CHUNK]))
        return index
    if kind_of(current.index) == "hnsw":  # a graph without the removed nodes: built again
        params = current.meta["params"]
        return build(vectors, "hnsw", m=params["m"], ef_search=params["ef_search"])
    index = faiss.clone_index(current.index)  # flat, ivf, ivfpq: the same cells and codebooks, refilled
    index.reset()
    for start in range(0, len(vectors), CHUNK):
        index.add(np.ascontiguousarray(vectors[start:start + CHUNK]))
    return index


def _link_enrolled(current: IndexDir, tmp: Path, keep: np.ndarray) -> None:
    """The uploaded images of the kept rows, and the files every version carries (model.pt, skipped_images.txt), in
    the next version: hard links where the file system has them (the files are never changed in place)."""
    for name in ("model.pt", "skipped_images.txt"):
        if (current.path / name).is_file():
            _link(current.path / name, tmp / name)
    enrolled = current.path.resolve() / ENROLLED
    for row in np.flatnonzero(keep):
        source = Path(current.paths[row])
        if source.parent == enrolled and source.is_file() and not (tmp / ENROLLED / source.name).exists():
            _link(source, tmp / ENROLLED / source.name)


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, target)


def _write_rows(tmp: Path, current: IndexDir, keep: np.ndarray, index, classes: list[str], paths: list[str], labels: np.ndarray, renumbered: bool = False) -> None:
    """paths.txt, labels.npy, classes.json, index.faiss and meta.json of the next version: the kept rows, then the new."""
    import json

    import faiss

    from mltk.knn import settings

    rows = np.flatnonzero(keep)
    kept_paths = [current.paths[i] for i in rows] + list(paths)
    kept_labels = labels if renumbered else np.concatenate([current.labels[rows], labels])
    faiss.write_index(index, str(tmp / "index.faiss"))
    (tmp / "paths.txt").write_text("".join(p + "\n" for p in kept_paths), encoding="utf-8", errors="surrogateescape")
    np.save(tmp / "labels.npy", np.asarray(kept_labels, np.int64))
    (tmp / "classes.json").write_text(json.dumps(classes))
    meta = {**current.meta, "count": len(kept_paths), "params": settings(index), "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
