"""Datasets: labelled images from a folder, a CSV or a registered name."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from PIL import Image

Source = Union[str, Path, Image.Image]


@dataclass
class LabelledImages:
    """Images (paths or PIL images) with integer labels indexing ``classes``."""

    sources: list[Source]
    labels: list[int]
    classes: list[str]
    name: str = ""
    root: Path | None = field(default=None)

    def __len__(self) -> int:
        return len(self.sources)


def digits() -> LabelledImages:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes) as greyscale images."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [Image.fromarray((img * 255 / 16).astype("uint8")) for img in bunch.images]
    return LabelledImages(images, [int(t) for t in bunch.target], [str(c) for c in range(10)], name="digits")
