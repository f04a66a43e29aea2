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
        left = PairList([self.pairs[i] for i in keep], folds, [self.lines[i] for i in keep], self.source)
        return check_kinds(left, " left once the unreadable images are left out")


def read_pairs(file: str | Path, root: str | Path) -> PairList:
    """A pair list from a ``.csv`` file or, otherwise, an LFW-style pairs file; paths under ``root``.

    It must hold matched and mismatched pairs: with one kind only, no verification metric
    (ROC-AUC, EER, TAR@FAR, accuracy) can be computed, so that is an error before any embedding.
    """
    file = Path(file)
    if not file.is_file():
        raise MltkError(f"pair list not found: {file}")
    try:
        data = file.read_bytes()
        lines = text_lines(data.decode("utf-8-sig"))  # a byte-order mark (Windows editors) is not part of line 1
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise MltkError(f"{file}, line {line}: not UTF-8 text; a pair list is a text file") from None
    except OSError as exc:
        raise MltkError(f"cannot read the pair list {str(file)!r}: {exc.strerror or exc}") from None
    pair_list = (read_csv_pairs if file.suffix.lower() == ".csv" else read_lfw_pairs)(file, root, lines)
    return check_kinds(pair_list)


def text_lines(text: str) -> list[str]:
    """The lines as an editor numbers them: split at newlines only (``splitlines`` also splits at form feeds, ...)."""
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def check_kinds(pair_list: PairList, after: str = "") -> PairList:
    """``pair_list`` as it is if it holds both matched and mismatched pairs; else one line saying so."""
    kinds = {same for _, _, same in pair_list.pairs}
    if len(kinds) < 2:
        kind, other = ("matched", "mismatched") if True in kinds else ("mismatched", "matched")
        raise MltkError(
            f"{pair_list.source}: every pair{after} is {kind} ({len(pair_list.pairs)}); ROC-AUC, EER, TAR@FAR and accuracy "
            f"need {other} pairs too"
        )
    return pair_list


def quote(line: str, limit: int = 120) -> str:
    """A line of the file, as it is there (tabs, quotes and all), cut if long."""
    return repr(line if len(line) <= limit else line[:limit] + "...")


def read_lfw_pairs(file: str | Path, root: str | Path, lines: list[str] | None = None) -> PairList:
    """LFW's ``pairs.txt`` (or ``pairsDevTrain.txt``/``pairsDevTest.txt``) exactly as distributed."""
    file, root = Path(file), Path(root)
    if lines is None:
        lines = text_lines(file.read_text(encoding="utf-8"))
    rows = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not rows:
        raise MltkError(f"{file}: the pair list is empty")
    header_line, header_text = rows[0]
    header = header_text.split()
    if not (1 <= len(header) <= 2 and all(f.isdigit() for f in header)):
        raise MltkError(f"{file}, line {header_line}: expected a header 'folds n' or 'n', got {quote(header_text)}")
    folds, per_set = (int(header[0]), int(header[1])) if len(header) == 2 else (None, int(header[0]))
    expected = 2 * per_set * (folds or 1)
    pairs = [_lfw_pair(file, root, n, line) for n, line in rows[1:]]
    if len(pairs) != expected:
        raise MltkError(f"{file}: the header (line {header_line}) announces {expected} pairs, the file has {len(pairs)}")
    fold_of = [i // (2 * per_set) for i in range(len(pairs))] if folds is not None else None
    return PairList(pairs, fold_of, [n for n, _ in rows[1:]], file)


def _lfw_pair(file: Path, root: Path, line: int, text: str) -> tuple[Path, Path, bool]:
    fields = text.split()
    if len(fields) == 3:
        fields = [fields[0], fields[1], fields[0], fields[2]]
    if len(fields) != 4 or not (fields[1].isdigit() and fields[3].isdigit()):
        raise MltkError(f"{file}, line {line}: expected 'name i j' or 'name1 i name2 j', got {quote(text)}")
    first, second = ((root / name / f"{name}_{int(i):04d}.jpg") for name, i in (fields[:2], fields[2:]))
    return first, second, fields[0] == fields[2]  # "name1 i name2 j" naming one person twice is a match


def read_csv_pairs(file: str | Path, root: str | Path, lines: list[str] | None = None) -> PairList:
    """A CSV ``path1,path2,same``, paths relative to ``root``; a first line that is not a pair is a header.

    A record is one line: a quote left open (which would run on over the lines after it) is an
    error naming the line where it opens.
    """
    file, root = Path(file), Path(root)
    if lines is None:
        lines = text_lines(file.read_text(encoding="utf-8"))
    pairs, numbers = [], []
    reader = csv.reader(lines)
    first_row = True
    while True:
        line = reader.line_num + 1  # the line the next record starts on
        try:
            fields = next(reader, None)
        except csv.Error as exc:
            raise MltkError(f"{file}, line {line}: not a readable CSV line ({exc}): {quote(lines[line - 1])}") from None
        if fields is None:
            break
        if reader.line_num > line:
            raise MltkError(f"{file}, line {line}: a quote opens and is not closed on that line: {quote(lines[line - 1])}")
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        same = fields[2].lower() if len(fields) == 3 else None
        header, first_row = first_row, False
        if same not in TRUE | FALSE:
            if header:
                continue
            raise MltkError(f"{file}, line {line}: expected 'path1,path2,same' with same 1/0/true/false, got {quote(lines[line - 1])}")
        pairs.append((root / fields[0], root / fields[1], same in TRUE))
        numbers.append(line)
    if not pairs:
        raise MltkError(f"{file}: the pair list is empty")
    return PairList(pairs, None, numbers, file)


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
