"""mltk.embedding: the one way a set of images becomes vectors, for validation, evaluate, index and EmbeddingModel.embed."""

import json

import numpy as np
import pytest
import torch

import mltk
from conftest import TINY, make_image_folder, not_an_image
from mltk.data import load_data
from mltk.errors import MltkError
from mltk.evaluate import evaluate, untrained_model


def test_validation_embeds_as_mltk_evaluate_does_whatever_precision_training_used(tmp_path, monkeypatch):
    """Validation under --amp embeds in float32, as evaluate does: metrics.jsonl's recall@1 is evaluate's for the same checkpoint."""
    from mltk import train as training
    from mltk.config import make_config
    from mltk.evaluate import embed, evaluate, held_out_data

    seen = []
    recall_at_1 = training.recall_at_1
    monkeypatch.setattr(training, "recall_at_1", lambda e, y, device=None: seen.append(np.array(e)) or recall_at_1(e, y, device))
    folder = make_image_folder(tmp_path / "images", classes=10, per_class=5)
    cfg = make_config({**TINY, "data": str(folder), "val_classes": 0.4, "batch_size": 12, "amp": True})  # bf16 steps on the CPU
    training.train(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    model = mltk.load(tmp_path / "run" / "last.pt", device="cpu")
    held_out = held_out_data(model)
    np.testing.assert_allclose(seen[-1], embed(model, held_out, batch_size=7, workers=0), atol=1e-5)  # bf16 would be ~1e-2 off
    assert evaluate(model, data=held_out, metrics=["recall_at_k"], workers=0).values["recall@1"] == record["val_recall@1"]


def test_embed_model_images_paths_and_pil_images_alike_and_a_bad_file_is_one_line(tmp_path):
    from PIL import Image

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    paths = sorted(folder.glob("*/*.png"))
    from_paths = model.embed(paths, batch_size=3)
    from_images = model.embed([Image.open(p) for p in paths])
    assert from_paths.dtype == torch.float32 and from_paths.shape == (4, model.embedder.dim)
    torch.testing.assert_close(from_paths, from_images)
    torch.testing.assert_close(from_paths.norm(dim=1), torch.ones(4))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MltkError, match=r"^1 images could not be read while embedding: .*broken\.png") as caught:
        model.embed([paths[0], tmp_path / "broken.png"])
    assert "\n" not in str(caught.value)


def test_embed_dataset_fills_a_given_array_in_order_and_reports_what_failed(tmp_path):
    from mltk.data import ImageDataset, load_data
    from mltk.embedding import embed_dataset

    folder = make_image_folder(tmp_path / "images", classes=3, per_class=3)
    (folder / "class_02" / "1.png").write_bytes(b"truncated")  # position 7
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    model.embedder.train()  # embed_dataset puts it in eval mode itself
    dataset = ImageDataset(load_data(str(folder)), model.transform, model.mode)
    target = np.full((9, model.embedder.dim), np.nan, np.float32)
    vectors, failed = embed_dataset(model.embedder, dataset, model.device, batch_size=4, workers=0, into=target)
    assert vectors is target and failed.tolist() == [7] and not np.isnan(target).any()
    assert not model.embedder.training
    one_by_one = np.stack([embed_dataset(model.embedder, torch.utils.data.Subset(dataset, [i]), model.device, 1, 0)[0][0] for i in range(9)])
    np.testing.assert_allclose(target, one_by_one, atol=1e-5)  # row i is image i whatever the batch
    flipped, _ = embed_dataset(model.embedder, dataset, model.device, batch_size=4, workers=0, flip_tta=True)
    np.testing.assert_allclose(np.linalg.norm(flipped, axis=1), 1, atol=1e-5)
    assert not np.allclose(flipped, target)  # the mirrored images count


def test_an_image_that_fails_while_embedding_is_an_error_not_a_stand_in(image_folder, monkeypatch):
    monkeypatch.setattr("mltk.evaluate.readable", lambda data, skipped: data)  # passes the scan, fails when embedded
    bad = not_an_image(image_folder / "class_01" / "2.png")
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    with pytest.raises(MltkError, match=f"1 images could not be read while embedding: {bad}"):
        evaluate(model, data=load_data(str(image_folder)), workers=0)
