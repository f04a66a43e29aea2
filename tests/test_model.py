"""EmbeddingModel, what ``mltk.load`` gives: what ``embed`` takes, and one line for what it does not."""

import numpy as np
import pytest
import torch
from PIL import Image

import mltk
from mltk.errors import UsageError


@pytest.mark.parametrize(
    "given, named",
    [
        (np.zeros((2, 3, 32, 32), dtype=np.float32), "got numpy.ndarray of shape (2, 3, 32, 32);"),
        (torch.zeros(2, 3, 32, 32), "got torch.Tensor of shape (2, 3, 32, 32);"),
        ([np.zeros((64, 64, 3), dtype=np.uint8)], "got numpy.ndarray of shape (64, 64, 3);"),
        (7, "got int;"),
    ],
    ids=["array-batch", "tensor-batch", "list-of-arrays", "int"],
)
def test_embed_of_what_is_not_an_image_is_one_short_line_saying_what_it_got(trained_run, given, named):
    model = mltk.load(trained_run[0])
    with pytest.raises(UsageError) as caught:
        model.embed(given)
    message = str(caught.value)
    assert message.startswith("embed takes image paths or PIL images (one or a list), " + named)
    assert "\n" not in message and len(message) < 300  # never the array's values
    assert "PIL.Image.fromarray" in message and "model.embedder.embed(batch)" in message


def test_embed_takes_paths_and_pil_images(trained_run):
    model = mltk.load(trained_run[0])
    path = next(trained_run[1].glob("*/*.png"))
    vectors = model.embed([path, str(path), Image.open(path)])
    assert vectors.shape == (3, model.embedder.dim) and torch.allclose(vectors[0], vectors[2], atol=1e-5)
