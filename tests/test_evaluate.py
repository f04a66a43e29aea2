"""mltk evaluate: a run's held-out classes, an untrained backbone, pair lists, query/gallery, the report."""

import json
import re

import numpy as np
import pytest
import torch

from conftest import evaluate_args, evaluate_forbid_work, make_image_folder, not_an_image, one_line_error, snapshot
from mltk.data import load_data
from mltk.errors import MltkError
from mltk.evaluate import evaluate, untrained_model
from mltk.model import load


def test_evaluate_on_held_out_classes_writes_metrics_and_a_report(trained_run, mltk_cli):
    run, _ = trained_run
    result = mltk_cli("evaluate", str(run), "--save-embeddings", "--workers", "0")
    assert result.returncode == 0, result.stderr
    out = run / "eval"
    values = json.loads((out / "metrics.json").read_text())
    for key in ("roc_auc", "eer", "balanced_accuracy", "recall@1", "recall@8", "precision@1", "map@r"):
        assert 0.0 <= values[key] <= 1.0, key
    assert values["tar@far=0.1"] is None and "tar@far=0.1" in values["not_measured"]  # 48 negative pairs: 4.8 false accepts at FAR 0.1
    assert values["queries"] == 12  # 3 held-out classes x 4 images
    assert np.load(out / "embeddings.npy").shape == (12, 16) and np.load(out / "labels.npy").shape == (12,)
    assert len((out / "paths.txt").read_text().splitlines()) == 12
    html = (out / "report.html").read_text()
    alts = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', html)
    assert [a.split(" (")[0] for a in alts] == [
        "Scores of same-class and different-class pairs", "ROC curve", "the worst queries and their nearest neighbours", "Training curves", "t-SNE", "UMAP",
    ]
    assert "<td>ROC-AUC</td>" in html.replace(' title="metrics.json: roc_auc"', "") and "Classes, worst first" in html
    assert re.search(r"verification\s.*ROC-AUC.*retrieval\s.*recall@1", result.stdout, re.S)  # the terminal's groups and labels: the page's
    assert "<h2>Configuration</h2>" in html and "<td>backbone</td><td>test_resnet</td>" in html  # the run's, from its config.yaml


def test_untrained_backbone_evaluates_from_the_command_line(trained_run, mltk_cli, tmp_path):
    _, folder = trained_run
    result = mltk_cli("evaluate", "--backbone", "test_resnet", "--data", str(folder), "--image-size", "32", "--out", str(tmp_path / "e"), "--no-report", "--metrics", "roc_auc,recall_at_k", "--workers", "0")
    assert result.returncode == 0, result.stderr
    values = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {"roc_auc", "recall@1", "recall@8"} <= set(values) and "map@r" not in values
    assert not (tmp_path / "e" / "report.html").exists()


def test_query_gallery_mode_aligns_classes_by_name(trained_run, tmp_path):
    _, folder = trained_run
    from conftest import make_image_folder

    gallery_dir = make_image_folder(tmp_path / "gallery", classes=10, per_class=3, seed=1)
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    query, gallery = load_data(str(folder)), load_data(str(gallery_dir))
    result = evaluate(model, query=query, gallery=gallery, workers=0, metrics=["recall_at_k"])
    # Independent check: brute-force nearest gallery item of each query.
    e, y = result.embeddings, result.labels
    sims = e[:40] @ e[40:].T
    expected = float(np.mean(y[40:][sims.argmax(1)] == y[:40]))
    assert result.values["recall@1"] == pytest.approx(expected)
    assert result.values["queries"] == 40


def test_pair_list_csv_is_scored(trained_run, tmp_path):
    run, folder = trained_run
    lines = ["path1,path2,same"] + [f"class_0{c}/0.png,class_0{c}/1.png,1" for c in range(5)] + [f"class_0{c}/0.png,class_0{c + 1}/2.png,0" for c in range(5)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    result = evaluate(load(run, device="cpu"), pairs_file=tmp_path / "pairs.csv", pairs_root=folder, workers=0)
    from sklearn.metrics import roc_auc_score

    e = result.embeddings
    index = {str(p): i for i, p in enumerate(result.sources)}
    scores = [float(e[index[str(folder / a)]] @ e[index[str(folder / b)]]) for a, b, _ in (line.split(",") for line in lines[1:])]
    assert result.values["roc_auc"] == pytest.approx(roc_auc_score([1] * 5 + [0] * 5, scores), abs=1e-4)
    assert "recall@1" not in result.values  # no labels: retrieval does not apply


def test_pair_list_with_a_missing_image_is_one_error_line(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    (tmp_path / "pairs.csv").write_text("class_00/0.png,class_00/9.png,1\nclass_00/0.png,class_01/0.png,0\n")
    line = one_line_error(mltk_main("evaluate", run, "--data", folder, "--pairs", tmp_path / "pairs.csv", "--out", tmp_path / "o"))
    assert "9.png" in line and not (tmp_path / "o" / "metrics.json").exists()


def test_evaluate_needs_a_run_or_a_backbone(mltk_cli):
    result = mltk_cli("evaluate")
    assert result.returncode == 2 and "give a RUN directory or checkpoint, or --backbone NAME" in result.stderr


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Six images of two classes: a query can retrieve 5 others, fewer than recall@8 needs."""
    from conftest import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("tiny") / "images", classes=2, per_class=3)


def test_a_tiny_set_gets_the_verification_metrics_asked_for(tiny_set):
    from mltk.errors import UsageError
    from mltk.evaluate import build_report

    model = untrained_model("test_resnet", image_size=32, device="cpu")
    result = evaluate(model, data=load_data(str(tiny_set)), metrics=["roc_auc"], workers=0)
    assert set(result.values) >= {"roc_auc", "pairs"} and "recall@1" not in result.values
    assert result.values["pairs"] == 15 and result.values["pairs_positive"] == 6
    html = build_report(result, "tiny")  # its retrieval examples: each query's 5 others, all a query can retrieve
    assert "Retrieval examples" in html
    assert "Configuration" not in html and "Training curves" not in html  # a bare backbone: no run to show
    with pytest.raises(UsageError) as refused:
        evaluate(model, data=load_data(str(tiny_set)), metrics=["roc_auc", "recall_at_k"], workers=0)
    message = str(refused.value)
    assert "\n" not in message and "recall_at_k" in message and "k=8" in message and "5 gallery items" in message


def test_a_tiny_set_from_the_command_line(tiny_set, mltk_main, tmp_path):
    from conftest import one_line_error

    common = ("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", tiny_set, "--workers", "0")
    code, _, err = mltk_main(*common, "--metrics", "roc_auc", "--no-report", "--out", tmp_path / "a")
    assert code == 0, err
    assert set(json.loads((tmp_path / "a" / "metrics.json").read_text())) >= {"roc_auc", "pairs"}
    line = one_line_error(mltk_main(*common, "--metrics", "recall_at_k", "--out", tmp_path / "b"))
    assert "recall_at_k" in line and "5 gallery items" in line and not (tmp_path / "b").exists()
    code, out, err = mltk_main(*common, "--no-report", "--out", tmp_path / "c")  # every metric: what the set allows, and a line on the rest
    assert code == 0, err
    values = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert 0 < values["map@r"] <= 1 and "roc_auc" in values and "recall@1" not in values
    assert "not computed: precision_at_k, recall_at_k (k=8 is more than the 5 gallery items a query can retrieve)" in out


def test_classes_pick_a_class_disjoint_split_of_one_folder(trained_run, mltk_main, tmp_path):
    from conftest import one_line_error

    run, folder = trained_run  # class_00 .. class_09, 4 images each
    code, _, err = mltk_main("evaluate", run, "--data", folder, "--classes", "class_0[7-8]", "--classes", "class_09", "--no-report", "--workers", "0", "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["queries"] == 12  # 3 classes x 4 images
    line = one_line_error(mltk_main("evaluate", run, "--data", folder, "--classes", "bird_*", "--out", tmp_path / "f"))
    assert "no class" in line and "bird_*" in line and not (tmp_path / "f").exists()
    line = one_line_error(mltk_main("evaluate", run, "--data", folder, "--pairs", tmp_path / "pairs.csv", "--classes", "class_0*"))
    assert "--classes" in line and "--pairs" in line


def test_query_images_also_in_the_gallery_are_refused_before_any_work(image_folder, mltk_main, tmp_path):
    """A query that is a gallery image finds itself (recall@1 1.0): refused, counting them, links resolved."""
    import os

    from conftest import make_image_folder, one_line_error, snapshot

    folder = image_folder  # 32 images
    gallery = make_image_folder(tmp_path / "gallery", classes=2, per_class=2, seed=1)
    os.symlink(folder / "class_03" / "1.png", gallery / "class_00" / "linked.png")
    os.symlink(folder, tmp_path / "same")
    common = ("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--workers", "0", "--out", tmp_path / "e")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*common, "--query", folder, "--gallery", tmp_path / "same"), code=2)
    assert line == (
        f"error: every --query image (32, e.g. {str(folder / 'class_00' / '0.png')!r}) is also in --gallery: such a query would find "
        "itself first and inflate recall; give a query and a gallery with no image in common (a dataset's own query and gallery: --data NAME:ROOT)"
    )
    line = one_line_error(mltk_main(*common, "--query", folder, "--gallery", gallery), code=2)
    assert f"error: 1 of the 32 --query images (e.g. {str(folder / 'class_03' / '1.png')!r}) is also in --gallery" in line
    assert snapshot(tmp_path) == before


def test_a_crop_of_a_gallery_image_is_shared_only_when_cut_alike(tmp_path):
    """One photo may hold several objects (crops): the same file cut to another box is another image."""
    from mltk.data import CroppedImage, LabelledImages
    from mltk.evaluate import shared_images

    photo = tmp_path / "photo.png"
    query = LabelledImages([CroppedImage(photo, (0, 0, 4, 4)), CroppedImage(photo, (4, 4, 8, 8))], [0, 0], ["a"])
    gallery = LabelledImages([CroppedImage(photo, (0, 0, 4, 4)), tmp_path / "other.png"], [0, 0], ["a"])
    assert shared_images(query, gallery) == [query.sources[0]]


def test_pairs_with_a_dataset_as_data_is_one_line_before_any_work(mltk_main, tmp_path):
    """A pair list's paths are joined to --data: a dataset spec or a file would give paths like 'cub200:ROOT/x.jpg'."""
    from conftest import one_line_error

    (tmp_path / "pairs.csv").write_text("a.jpg,b.jpg,1\na.jpg,c.jpg,0\n")
    common = ("evaluate", "--backbone", "test_resnet", "--pairs", tmp_path / "pairs.csv", "--out", tmp_path / "e")
    line = one_line_error(mltk_main(*common, "--data", f"cub200:{tmp_path}"), code=2)
    assert line == f"error: --pairs needs --data: the folder its image names are relative to; {f'cub200:{tmp_path}'!r} is not a folder"
    line = one_line_error(mltk_main(*common, "--data", tmp_path / "pairs.csv"), code=2)
    assert line.endswith(f"; {str(tmp_path / 'pairs.csv')!r} is a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.csv"]


def test_evaluate_never_replaces_its_own_input(trained_run, mltk_main, tmp_path):
    """mltk replaces only what it wrote, never its own input: an --out that is the data, or holds the run, is refused."""
    import shutil

    from conftest import one_line_error, snapshot

    run, folder = trained_run
    shutil.copytree(run, tmp_path / "runs" / "a")
    shutil.copytree(folder, tmp_path / "images")
    before = snapshot(tmp_path)
    common = ("evaluate", tmp_path / "runs" / "a", "--data", tmp_path / "images", "--workers", "0", "--out")
    line = one_line_error(mltk_main(*common, tmp_path / "images"), code=1)
    assert line == f"error: --out {str(tmp_path / 'images')!r} is --data {str(tmp_path / 'images')!r}, an input of this command; mltk never replaces its own input: give a new or empty folder"
    line = one_line_error(mltk_main(*common, tmp_path / "runs"), code=1)
    assert line.startswith(f"error: --out {str(tmp_path / 'runs')!r} holds RUN {str(tmp_path / 'runs' / 'a')!r}, an input of this command")
    assert snapshot(tmp_path) == before


# ---- Which checkpoint is scored, and what metrics.json and thresholds.json record of the evaluation --------------


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """The tiny run (7 classes trained, 3 held out, 1 epoch: best.pt is epoch 1's, chosen on the 3) in a folder of its own."""
    import shutil

    run, folder = trained_run
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval*"))
    return tmp_path / "run", folder


def test_a_run_directory_is_scored_at_its_last_pt_and_best_pt_only_when_asked_with_a_warning(run_copy, mltk_main):
    """best.pt was chosen by validation recall@1 on the held-out classes `mltk evaluate RUN` scores: its figures flatter it."""
    run, _ = run_copy
    code, out, err = mltk_main("evaluate", run, "--no-report", "--workers", "0")
    assert code == 0 and err == "", err
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())["evaluated"]
    assert (evaluated["checkpoint"], evaluated["checkpoint_epoch"]) == (str((run / "last.pt").resolve()), 1)
    assert evaluated["held_out"] is True and evaluated["checkpoint_chosen_on_evaluated_classes"] is False
    assert f"scored {(run / 'last.pt').resolve()}, epoch 1" in " ".join(out.split())

    code, out, err = mltk_main("evaluate", run, "--checkpoint", "best", "--no-report", "--workers", "0")
    assert code == 0, err
    assert err == (
        "warning: best.pt (epoch 1) was chosen by validation recall@1 on classes evaluated here: its figures flatter it; "
        "last.pt, the default, was chosen on nothing\n"
    )
    evaluated = json.loads((run / "eval-best" / "metrics.json").read_text())["evaluated"]  # RUN/eval stays last.pt's
    assert evaluated["checkpoint"] == str((run / "best.pt").resolve()) and evaluated["checkpoint_chosen_on_evaluated_classes"] is True
    assert json.loads((run / "eval" / "metrics.json").read_text())["evaluated"]["checkpoint"].endswith("last.pt")


def test_checkpoint_goes_with_a_run_directory_only(run_copy, mltk_main, tmp_path):
    from conftest import one_line_error

    run, folder = run_copy
    line = one_line_error(mltk_main("evaluate", run / "last.pt", "--checkpoint", "best", "--out", tmp_path / "e"), code=2)
    assert line == f"error: --checkpoint best picks the best.pt of a run directory, and {str(run / 'last.pt')!r} is not one: give the run directory, or leave --checkpoint out"
    line = one_line_error(mltk_main("evaluate", "--backbone", "test_resnet", "--data", folder, "--checkpoint", "last", "--out", tmp_path / "e"), code=2)
    assert "--checkpoint picks best.pt or last.pt of a RUN directory" in line
    (run / "best.pt").unlink()
    line = one_line_error(mltk_main("evaluate", run, "--checkpoint", "best", "--out", tmp_path / "e"), code=1)
    assert line == f"error: run directory {str(run)!r} has no best.pt"
    assert not (tmp_path / "e").exists()


def test_metrics_and_thresholds_json_record_what_was_evaluated(run_copy, mltk_main, tmp_path):
    """The data as named and a fingerprint of its listing, the classes kept, the model, the checkpoint, mltk and the time;
    and whether the run trained on any class evaluated (by name: its checkpoint's classes)."""
    import shutil
    import time

    from mltk import __version__
    from mltk.evaluate import METRICS_FORMAT

    run, folder = run_copy
    trained = load(run, device="cpu").classes  # the 7 training classes
    code, _, err = mltk_main("evaluate", run, "--data", folder, "--classes", "class_0[0-4]", "--no-report", "--workers", "0", "--out", tmp_path / "e")
    assert code == 0, err
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert written["format"] == METRICS_FORMAT and 0 <= written["roc_auc"] <= 1 and written["queries"] == 20  # the metrics where they were
    evaluated = written["evaluated"]
    assert {k: evaluated[k] for k in ("data", "classes_filter", "classes", "images", "checkpoint", "checkpoint_epoch", "mltk_version")} == {
        "data": str(folder), "classes_filter": ["class_0[0-4]"], "classes": 5, "images": 20,
        "checkpoint": str((run / "last.pt").resolve()), "checkpoint_epoch": 1, "mltk_version": __version__,
    }
    assert evaluated["model"] == load(run, device="cpu").fingerprint()
    assert abs(time.mktime(time.strptime(evaluated["evaluated_at"], "%Y-%m-%dT%H:%M:%S%z")) - time.time()) < 600
    seen = sum(f"class_0{c}" in trained for c in range(5))
    assert evaluated["training_classes_evaluated"] == seen > 0
    assert f"warning: {seen} of the 5 evaluated classes are classes the run trained on (by name)" in err

    calibration = json.loads((tmp_path / "e" / "thresholds.json").read_text())
    assert calibration["source"] == f"all pairs of {folder.name}, the 5 classes matching 'class_0[0-4]'"
    assert calibration["evaluated"] == evaluated

    # The listing's fingerprint: the same images anywhere give the same one; other classes another.
    shutil.copytree(folder, tmp_path / "moved")
    for name, classes in (("same", "class_0[0-4]"), ("other", "class_0[5-9]")):
        code, _, err = mltk_main("evaluate", run, "--data", tmp_path / "moved", "--classes", classes, "--no-report", "--workers", "0", "--metrics", "roc_auc", "--out", tmp_path / name)
        assert code == 0, err
    fingerprint = {name: json.loads((tmp_path / name / "metrics.json").read_text())["evaluated"]["data_fingerprint"] for name in ("same", "other")}
    assert fingerprint["same"] == evaluated["data_fingerprint"] != fingerprint["other"]


def test_a_library_evaluation_of_a_pair_list_records_it(run_copy, tmp_path):
    """A pair list names no classes: whether the run trained on them is not known (null), not said to be no."""
    run, folder = run_copy
    (tmp_path / "pairs.csv").write_text("class_00/0.png,class_00/1.png,1\nclass_00/0.png,class_01/0.png,0\n")
    result = evaluate(load(run, device="cpu"), pairs_file=tmp_path / "pairs.csv", pairs_root=folder, workers=0, metrics=["roc_auc"])
    evaluated = result.provenance
    assert evaluated["pairs"] == str(tmp_path / "pairs.csv") and evaluated["images"] == 3 and evaluated["classes"] is None
    assert evaluated["training_classes_evaluated"] is None and json.loads(json.dumps(evaluated)) == evaluated  # plain JSON values


def test_the_checkpoint_option_names_what_the_model_module_knows():
    """The CLI writes the choices out (importing mltk.model would import torch into `mltk --help`)."""
    from mltk.cli.options import CheckpointKind
    from mltk.checkpoint import CHECKPOINTS

    assert [kind.value for kind in CheckpointKind] == list(CHECKPOINTS)


# --- --out: checked before the work; never clobbers what mltk evaluate did not write; whole or absent


@pytest.mark.parametrize(
    "case, expected",
    [
        ("a file", r"--out '.*/notes.txt' is a file, not a folder"),
        ("under a file", r"cannot write --out '.*/notes.txt/eval': '.*/notes.txt' is a file, not a folder"),
        ("a folder of other files", r"--out '.*/mine' is not empty and not an earlier evaluation \('data.csv', 'paper.tex'\); mltk replaces only what it wrote: give a new or empty folder"),
        ("a folder with a report.html only", r"--out '.*/mine' is not empty and not an earlier evaluation \(no metrics.json\)"),
    ],
)
def test_evaluate_out_that_cannot_be_used_is_one_line_before_any_work(case, expected, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    if case == "a folder of other files":
        (tmp_path / "mine" / "paper.tex").write_text("draft")
        (tmp_path / "mine" / "data.csv").write_text("1,2")
    elif case == "a folder with a report.html only":
        (tmp_path / "mine" / "report.html").write_text("<p>my own report</p>")
    out = {"a file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "eval"}.get(case, tmp_path / "mine")
    before = snapshot(tmp_path)
    evaluate_forbid_work(monkeypatch)
    line = one_line_error(mltk_main(*evaluate_args(run, folder, out)), code=1)
    assert re.search(expected, line), line
    assert snapshot(tmp_path) == before


def test_evaluate_replaces_its_own_earlier_folder_whole(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "eval"
    out.mkdir()  # an empty folder is fine
    code, _, err = mltk_main(*evaluate_args(run, folder, out, "--save-embeddings"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "labels.npy", "metrics.json", "paths.txt", "thresholds.json"]
    # Again, without --save-embeddings: the folder holds this evaluation's files only, not a mix of two.
    code, _, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "thresholds.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporaries beside it
    # The default, RUN/eval, is re-run as often as one likes.
    for _ in range(2):
        code, _, err = mltk_main("evaluate", run, "--no-report", "--workers", "0", "--metrics", "recall_at_k")
        assert code == 0, err
    assert json.loads((run / "eval" / "metrics.json").read_text())["queries"] == 12
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_evaluate_that_fails_midway_leaves_the_earlier_evaluation_as_it_was(trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    out = tmp_path / "eval"
    assert mltk_main(*evaluate_args(run, folder, out, "--save-embeddings"))[0] == 0
    before = snapshot(tmp_path)
    import mltk.evaluate

    def fail(*args, **kwargs):
        raise MltkError("the metrics broke")

    monkeypatch.setattr(mltk.evaluate, "write_outputs", fail)  # after the (other: --flip-tta) embeddings were streamed
    assert one_line_error(mltk_main(*evaluate_args(run, folder, out, "--save-embeddings", "--flip-tta"))) == "error: the metrics broke"
    assert snapshot(tmp_path) == before


def test_an_interrupted_evaluation_leaves_no_folder(tmp_path):
    from mltk.evaluate import output_folder

    out = tmp_path / "new" / "deeper" / "eval"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out) as folder:
            (folder / "metrics.json").write_text("{}")
            raise KeyboardInterrupt  # Ctrl-C while embedding
    assert list(tmp_path.iterdir()) == []  # not even the folders made for it
    with output_folder(out) as folder:
        (folder / "metrics.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and [p.name for p in out.parent.iterdir()] == ["eval"]


def test_evaluate_keeps_files_put_into_out_while_it_runs(tmp_path):
    """--out is checked again just before the swap: what the user put there meanwhile is theirs, not replaced."""
    from mltk.evaluate import check_out, output_folder

    out = check_out(tmp_path / "eval")
    with pytest.raises(MltkError, match=r"is not empty and not an earlier evaluation \('notes.txt'\)"):
        with output_folder(out) as folder:
            (folder / "metrics.json").write_text("{}")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_metrics_json_is_strict_json_with_null_for_values_that_are_not_finite(tmp_path):
    """JSON has no Infinity or NaN (JSON.parse, jq and most readers refuse them): such a metric is written as null."""
    from mltk.evaluate import EvalResult, write_outputs

    values = {"accuracy_threshold": float("inf"), "eer_threshold": np.float32("nan"), "roc_auc": np.float64(0.75), "pairs": np.int64(6)}
    write_outputs(EvalResult(values, None, np.zeros((0, 2), np.float32), None, [], []), tmp_path, save_embeddings=False)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert {key: written[key] for key in values} == {"accuracy_threshold": None, "eer_threshold": None, "roc_auc": 0.75, "pairs": 6}


# --- options, names and images: one line before any work


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--batch-size", "0"], "error: --batch-size must be a positive number of images, got 0"),
        (["--workers", "-1"], "error: --workers must be 0 (load in this process) or more processes, got -1"),
        (["--max-pairs", "0"], "error: --max-pairs must be a positive number of pairs, got 0"),
        (["--backbone", "test_resnet", "--image-size", "-5"], "error: --image-size must be a side in pixels from 8 to 4096, got -5"),
        (["--image-size", "64"], "error: --pretrained, --weights and --image-size go with --backbone; a run's checkpoint has its own"),
        (["--index", "ivf", "--nprobe", "0"], "error: --nprobe must be a positive number, got 0"),
        (["--device", "gpu0"], "error: --device 'gpu0' is not a device torch knows; give cpu, cuda, cuda:1, mps, ..."),
        pytest.param(
            ["--device", "cuda:3"], "error: --device 'cuda:3': there is no such CUDA GPU here (0 found); give --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU"),
        ),
    ],
)
def test_evaluate_numbers_out_of_range_are_one_line_before_any_work(options, expected, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    evaluate_forbid_work(monkeypatch)
    target = [] if "--backbone" in options else [run]
    args = ["evaluate", *target, "--data", folder, "--out", tmp_path / "eval", "--workers", "0", *options]
    assert one_line_error(mltk_main(*args), code=2) == expected
    assert list(tmp_path.iterdir()) == []


def test_unknown_metric_is_one_line_with_a_suggestion(mltk_main, image_folder, tmp_path):
    code, out, err = mltk_main("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", image_folder, "--workers", "0", "--metrics", "roc_auc,recal_at_k", "--out", tmp_path / "e")
    assert (code, out.strip(), err) == (2, "", "error: unknown metric 'recal_at_k'; did you mean 'recall_at_k' or 'precision_at_k'?\n")
    assert not (tmp_path / "e").exists()


def test_evaluate_prints_paths_as_they_are_not_as_rich_markup(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "[/bold] [red]eval[/red]"
    code, stdout, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert f"written to {out}: metrics.json" in " ".join(stdout.split())
    assert (out / "metrics.json").is_file()


def test_pairs_naming_an_unreadable_image_are_left_out(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=3)
    bad = not_an_image(folder / "class_01" / "0.png")
    (tmp_path / "pairs.csv").write_text("class_00/0.png,class_00/1.png,1\nclass_01/0.png,class_01/1.png,1\nclass_02/0.png,class_03/0.png,0\n")
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    result = evaluate(model, pairs_file=tmp_path / "pairs.csv", pairs_root=folder, workers=0, metrics=["roc_auc"])
    assert result.values["pairs"] == 2 and result.skipped == [(bad, "not an image")]
    result = evaluate(model, data=load_data(str(folder)), workers=0, metrics=["recall_at_k"])
    assert result.values["queries"] == 11 and result.skipped == [(bad, "not an image")]


@pytest.mark.parametrize("options, refused", [
    ({}, "give a RUN directory or checkpoint, or --backbone NAME for an untrained backbone"),
    ({"backbone": "test_resnet", "query": "q"}, "--query and --gallery go together"),
    ({"backbone": "test_resnet", "data": "digits", "pairs": "pairs.txt"}, "--pairs needs --data: the folder its image names are relative to; 'digits' is not a folder"),
    ({"backbone": "test_resnet", "checkpoint": "best", "data": "digits"}, "--checkpoint picks best.pt or last.pt of a RUN directory"),
    ({"run": "runs/a", "image_size": 64}, "--pretrained, --weights and --image-size go with --backbone"),
    ({"backbone": "test_resnet", "data": "digits", "index": "hnsw", "nprobe": 4}, "--nprobe goes with --index ivf or ivfpq, --ef-search with --index hnsw"),
    ({"backbone": "test_resnet", "data": "digits", "max_pairs": 0}, "--max-pairs must be a positive number of pairs, got 0"),
    ({"backbone": "test_resnet", "data": "digits", "metrics": ["recal_at_k"]}, "unknown metric 'recal_at_k'"),
    ({"backbone": "test_resnet", "data": "digits", "rerank": "k-reciprocal:k9=1"}, "k9"),
])
def test_an_evaluate_request_that_contradicts_itself_is_refused_by_its_check_before_any_work(options, refused, monkeypatch, tmp_path):
    from mltk.evaluate import EvaluateRequest

    evaluate_forbid_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MltkError, match=re.escape(refused)):
        EvaluateRequest(**{"out": tmp_path / "e", **options}).check()
    assert sorted(tmp_path.iterdir()) == []  # no folder made


def test_a_checked_evaluate_request_resolves_its_checkpoint_output_and_reranker_once(trained_run, monkeypatch):
    from mltk import rerank
    from mltk.embedding import EmbedSettings
    from mltk.evaluate import EvaluateRequest

    built = []
    real = rerank.create
    monkeypatch.setattr(rerank, "create", lambda spec: built.append(spec) or real(spec))
    monkeypatch.setattr("mltk.evaluate.create_reranker", rerank.create)
    run, _ = trained_run
    request = EvaluateRequest(run=run, checkpoint="best", rerank="qe:n=2", embed=EmbedSettings(batch_size=0))
    with pytest.raises(MltkError, match="^--batch-size must be a positive number of images, got 0$"):
        request.check()
    checked = EvaluateRequest(run=run, checkpoint="best", rerank="qe:n=2").check()
    assert (checked.scored, checked.out) == (run / "best.pt", run / "eval-best") and built == ["qe:n=2"]
    assert checked.reranker is not None and checked.engine == "blocks" and checked.index_options == {}
