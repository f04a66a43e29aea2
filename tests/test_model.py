"""EmbeddingModel, what ``mltk.load`` gives: what ``embed`` takes, and one line for what it does not."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mltk
from conftest import TINY
from mltk.errors import MltkError, UsageError


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


def test_preprocessing_of_other_channels_than_the_model_takes_is_named(evaluate_checkpoint, tmp_path):
    from mltk.config import make_config, to_dict
    from mltk.model import build_embedder

    cfg = make_config({**TINY, "backbone_kwargs": {"in_chans": 1}})
    state = dict(evaluate_checkpoint, config=to_dict(cfg), model=build_embedder(cfg).state_dict())  # weights fit; data_config is RGB
    torch.save(state, tmp_path / "grey.pt")
    with pytest.raises(MltkError, match=r"grey.pt': data_config.input_size has 3 channels, the model takes 1$"):
        mltk.load(tmp_path / "grey.pt")


def test_device_auto_works_for_evaluate_index_and_search_as_for_run(trained_run, mltk_main, tmp_path):
    """``--device auto`` (mltk run's default) is the GPU when there is one, else the CPU, for every command."""
    run, folder = trained_run
    code, out, err = mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--workers", "0", "--no-report", "--device", "auto")
    assert code == 0 and (tmp_path / "eval" / "metrics.json").is_file(), err
    code, out, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--workers", "0", "--device", "auto")
    assert code == 0, err
    query = sorted(folder.glob("class_00/*.png"))[0]
    code, out, err = mltk_main("search", tmp_path / "index", query, "--k", "1", "--json", "--device", "auto")
    assert code == 0 and json.loads(out)[0]["neighbours"][0]["path"] == str(query.resolve()), err
