"""Verification pair lists: LFW's ``pairs.txt`` and a CSV of ``path1,path2,same``.

LFW's format: a header ``folds n`` (``10 300``: ten folds of 300 matched then 300 mismatched
pairs) or ``n`` (``pairsDevTrain.txt``: n matched then n mismatched, no folds), then one pair a
line, ``name i j`` for two images of one person and ``name1 i name2 j`` for two people; image i of
a person is ``<root>/<name>/<name>_%04d.jpg``. The CSV's paths are relative to the root, its
``same`` is 1/0/true/false and its header line is optional.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from mltk.errors import MltkError

TRUE, FALSE = {"1", "true"}, {"0", "false"}


@dataclass(frozen=True)
class PairList:
    """Pairs ``(path1, path2, same)``, the fold of each (None: the file has no folds), and the line of each."""

    pairs: list[tuple[Path, Path, bool]]
    folds: list[int] | None
    lines: list[int]
    source: Path

    def index(self) -> tuple[list[Path], list[int], list[int]]:
        """The distinct images (first-seen order) and, per pair, the positions of its two images."""
        position: dict[Path, int] = {}
        for first, second, _ in self.pairs:
            position.setdefault(first, len(position))
            position.setdefault(second, len(position))
        return list(position), [position[p[0]] for p in self.pairs], [position[p[1]] for p in self.pairs]

    def without(self, images: set[Path]) -> "PairList":
        """The pairs that name none of ``images`` (unreadable files), with their folds and lines."""
        keep = [i for i, (first, second, _) in enumerate(self.pairs) if first not in images and second not in images]
        if not keep:
            raise MltkError(f"{self.source}: no pair is left once the unreadable images are left out")
        folds = [self.folds[i] for i in keep] if self.folds is not None else None
        return PairList([self.pairs[i] for i in keep], folds, [self.lines[i] for i in keep], self.source)


def read_pairs(file: str | Path, root: str | Path) -> PairList:
    """A pair list from a ``.csv`` file or, otherwise, an LFW-style pairs file; paths under ``root``."""
    file = Path(file)
    if not file.is_file():
        raise MltkError(f"pair list not found: {file}")
    return (read_csv_pairs if file.suffix.lower() == ".csv" else read_lfw_pairs)(file, root)


def read_lfw_pairs(file: str | Path, root: str | Path) -> PairList:
    """LFW's ``pairs.txt`` (or ``pairsDevTrain.txt``/``pairsDevTest.txt``) exactly as distributed."""
    file, root = Path(file), Path(root)
    rows = [(n, line.split()) for n, line in enumerate(file.read_text().splitlines(), start=1) if line.strip()]
    if not rows:
        raise MltkError(f"{file}: the pair list is empty")
    header_line, header = rows[0]
    if not (1 <= len(header) <= 2 and all(f.isdigit() for f in header)):
        raise MltkError(f"{file}, line {header_line}: expected a header 'folds n' or 'n', got {' '.join(header)!r}")
    folds, per_set = (int(header[0]), int(header[1])) if len(header) == 2 else (None, int(header[0]))
    expected = 2 * per_set * (folds or 1)
    pairs = [_lfw_pair(file, root, n, fields) for n, fields in rows[1:]]
    if len(pairs) != expected:
        raise MltkError(f"{file}: the header (line {header_line}) announces {expected} pairs, the file has {len(pairs)}")
    fold_of = [i // (2 * per_set) for i in range(len(pairs))] if folds is not None else None
    return PairList(pairs, fold_of, [n for n, _ in rows[1:]], file)


def _lfw_pair(file: Path, root: Path, line: int, fields: list[str]) -> tuple[Path, Path, bool]:
    if len(fields) == 3:
        fields = [fields[0], fields[1], fields[0], fields[2]]
    if len(fields) != 4 or not (fields[1].isdigit() and fields[3].isdigit()):
        raise MltkError(f"{file}, line {line}: expected 'name i j' or 'name1 i name2 j', got {' '.join(fields)!r}")
    first, second = ((root / name / f"{name}_{int(i):04d}.jpg") for name, i in (fields[:2], fields[2:]))
    return first, second, fields[0] == fields[2]  # "name1 i name2 j" naming one person twice is a match


def read_csv_pairs(file: str | Path, root: str | Path) -> PairList:
    """A CSV ``path1,path2,same``, paths relative to ``root``; a first line that is not a pair is a header."""
    file, root = Path(file), Path(root)
    pairs, lines = [], []
    with file.open(newline="") as handle:
        reader = csv.reader(handle)
        first_row = True
        for fields in reader:
            fields = [f.strip() for f in fields]
            if not any(fields):
                continue
            same = fields[2].lower() if len(fields) == 3 else None
            header, first_row = first_row, False
            if same not in TRUE | FALSE:
                if header:
                    continue
                raise MltkError(f"{file}, line {reader.line_num}: expected 'path1,path2,same' with same 1/0/true/false, got {','.join(fields)!r}")
            pairs.append((root / fields[0], root / fields[1], same in TRUE))
            lines.append(reader.line_num)
    if not pairs:
        raise MltkError(f"{file}: the pair list is empty")
    return PairList(pairs, None, lines, file)


def check_images(pair_list: PairList) -> None:
    """Raise MltkError naming the first image a pair names that is not there (with its line)."""
    missing, seen = [], set()
    for (first, second, _), line in zip(pair_list.pairs, pair_list.lines):
        for path in (first, second):
            if path not in seen:
                seen.add(path)
                if not path.is_file():
                    missing.append((line, path))
    if missing:
        line, path = missing[0]
        more = f" ({len(missing) - 1} more images missing)" if len(missing) > 1 else ""
        raise MltkError(f"{pair_list.source}, line {line}: image not found: {path}{more}")
