"""CenterLoss, the cross-entropy loss and the weighted sum a loss spec names, against values computed by hand."""

import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from mltk.config import make_config
from mltk.errors import UsageError
from mltk.losses import CenterLoss, CrossEntropyLoss, build_losses, check_loss_names


def test_center_loss_raw_features_equals_hand_computation():
    loss_fn = CenterLoss(num_classes=2, embedding_size=2, distance=LpDistance(normalize_embeddings=False, p=2, power=2))
    with torch.no_grad():
        loss_fn.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 3.0]])
    y = torch.tensor([0, 0, 1])
    # 1/2 |x - c|^2 per sample: 0.5 * 1, 0.5 * 4, 0.5 * (0 + 4); mean = (0.5 + 2 + 2) / 3
    # (torch's pairwise_distance adds eps=1e-6 to the difference, hence the tolerance)
    assert loss_fn(x, y).item() == pytest.approx(1.5, abs=1e-5)


def test_center_loss_default_is_on_the_unit_sphere():
    loss_fn = CenterLoss(num_classes=1, embedding_size=2)
    with torch.no_grad():
        loss_fn.centers.copy_(torch.tensor([[0.0, 5.0]]))
    x = torch.tensor([[3.0, 0.0], [0.0, 0.1]])
    # normalised: (1,0) vs (0,1) -> 1/2 * 2 = 1; (0,1) vs (0,1) -> 0
    assert loss_fn(x, torch.tensor([0, 0])).item() == pytest.approx(0.5)
    similarity = CenterLoss(num_classes=1, embedding_size=2, distance=CosineSimilarity())
    with torch.no_grad():
        similarity.centers.copy_(torch.tensor([[0.0, 5.0]]))
    assert similarity(x, torch.tensor([0, 0])).item() == pytest.approx(0.5)  # 1 - cos: 1 and 0


def test_center_loss_centers_receive_gradients_and_move():
    torch.manual_seed(0)
    loss_fn = CenterLoss(num_classes=3, embedding_size=2)
    x = torch.randn(6, 2, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    before = loss_fn.centers.detach().clone()
    loss = loss_fn(x, y)
    loss.backward()
    assert loss_fn.centers.grad is not None and loss_fn.centers.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    torch.optim.SGD(loss_fn.parameters(), lr=0.5).step()
    assert loss_fn(x, y).item() < loss.item() and not torch.equal(before, loss_fn.centers)


def test_cross_entropy_matches_torch():
    torch.manual_seed(0)
    loss_fn = CrossEntropyLoss(num_classes=4, embedding_size=3)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0])
    expected = torch.nn.functional.cross_entropy(loss_fn.classifier(x), y)
    assert loss_fn(x, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_loss_spec_builds_its_weighted_sum_with_each_loss_options():
    cfg = make_config({"loss": "0.25*center+ce", "loss_options": {"ce": {"label_smoothing": 0.1}}})
    losses = build_losses(cfg, num_classes=3, dim=2)
    assert losses.weights == {"center": 0.25, "ce": 1.0} and losses.losses["ce"].label_smoothing == 0.1
    torch.manual_seed(0)
    x, y = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    total, parts = losses(x, y)
    assert parts["center"].item() == pytest.approx(losses.losses["center"](x, y).item())
    assert total.item() == pytest.approx(0.25 * parts["center"].item() + parts["ce"].item())


def test_a_misspelt_loss_name_is_one_usage_error_naming_the_close_match():
    check_loss_names("0.01*center+ce+arcface")
    with pytest.raises(UsageError, match="unknown loss 'arcfase'; did you mean 'arcface'"):
        check_loss_names("ce+arcfase")


@pytest.mark.parametrize("name", ["DynamicSoftMarginLoss", "HistogramLoss", "ManifoldLoss", "VICRegLoss"])
def test_a_loss_that_cannot_train_is_refused_in_one_line_before_any_work(mltk_main, tmp_path, name):
    from conftest import make_image_folder, snapshot

    images = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    before = snapshot(images)
    code, out, err = mltk_main("run", "--data", images, "--backbone", "test_resnet", "--loss", f"ce+{name}", "--out", tmp_path / "run")
    assert code == 2 and err.startswith(f"error: loss {name!r} cannot train under mltk run: it ")
    assert err.endswith("see `mltk list losses` for the others\n") and err.count("\n") == 1
    assert not (tmp_path / "run").exists() and snapshot(images) == before


def test_mltk_list_losses_says_which_cannot_train(mltk_main):
    from mltk.losses import CANNOT_TRAIN

    code, out, err = mltk_main("list", "losses", "*Loss")
    text = " ".join(out.split())  # the table wraps long descriptions
    assert code == 0 and sorted(CANNOT_TRAIN) == ["DynamicSoftMarginLoss", "HistogramLoss", "ManifoldLoss", "VICRegLoss"]
    for name, why in CANNOT_TRAIN.items():
        assert f"{name} mltk pytorch-metric-learning; cannot train under mltk run: {why}" in text
    assert text.count("cannot train") == len(CANNOT_TRAIN) and "TripletMarginLoss mltk pytorch-metric-learning " in text
