"""Adversarial input to mltk evaluate and export: output paths, checkpoint fields, pair lists, markup, numbers.

Each refusal is one ``error:`` line, a non-zero exit, before any work (the model is not even loaded),
and the disk as it was; each output is complete or absent.
"""

import errno
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import TINY, one_line_error, snapshot

import mltk
from mltk.errors import MltkError

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:FutureWarning")  # torch's deprecation notice


def evaluate_forbid_work(monkeypatch):
    """Loading a model or embedding fails the test: a refusal must come before either."""

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the input was checked")

    import mltk.evaluate
    import mltk.model

    monkeypatch.setattr(mltk.model, "load", no_work)
    monkeypatch.setattr(mltk.evaluate, "untrained_model", no_work)
    monkeypatch.setattr(mltk.evaluate, "embed", no_work)


def evaluate_args(run, folder, out, *more):
    return ("evaluate", run, "--data", folder, "--out", out, "--no-report", "--workers", "0", "--metrics", "roc_auc,recall_at_k", *more)


# --- 1. --out: checked before the work; never clobbers what mltk evaluate did not write; whole or absent ------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("a file", r"--out '.*/notes.txt' is a file, not a folder"),
        ("under a file", r"cannot write --out '.*/notes.txt/eval': '.*/notes.txt' is a file, not a folder"),
        ("a folder of other files", r"--out '.*/mine' is not empty and not an earlier evaluation \('data.csv', 'paper.tex'\); give a new or empty folder"),
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
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "labels.npy", "metrics.json", "paths.txt"]
    # Again, without --save-embeddings: the folder holds this evaluation's files only, not a mix of two.
    code, _, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
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


# --- 2. Every field of a checkpoint is checked on load ------------------------------------------------------------


def _data_config(**change):
    def apply(state):
        state["data_config"] = {**state["data_config"], **change}

    return apply


def _drop(key):
    return lambda state: state.pop(key)


def _put(key, value):
    return lambda state: state.update({key: value})


def _config(**change):
    def apply(state):
        state["config"] = {**state["config"], **change}

    return apply


CHECKPOINT_CASES = {
    "no data_config": (_drop("data_config"), r"lacks the field data_config"),
    "data_config not a mapping": (_put("data_config", [3, 32, 32]), r"data_config must be a mapping, got \[3, 32, 32\]"),
    "negative input_size": (_data_config(input_size=(3, -5, 32)), r"data_config.input_size must be \[channels, height, width\].*got \(3, -5, 32\)"),
    "huge input_size": (_data_config(input_size=(3, 100000, 100000)), r"data_config.input_size must be .*sides 1 to 4096"),
    "2 channels": (_data_config(input_size=(2, 32, 32), mean=(0.5, 0.5), std=(0.5, 0.5)), r"data_config.input_size must be .*1 or 3 channels"),
    "unknown interpolation": (_data_config(interpolation="cubic"), r"data_config.interpolation must be one of nearest, bilinear, bicubic, box, hamming, lanczos, got 'cubic'"),
    "short mean": (_data_config(mean=(0.5, 0.5)), r"data_config.mean must be 3 finite numbers, one per channel, got \(0.5, 0.5\)"),
    "nan std": (_data_config(std=(0.5, float("nan"), 0.5)), r"data_config.std must be 3 finite numbers > 0"),
    "zero std": (_data_config(std=(0.5, 0.0, 0.5)), r"data_config.std must be 3 finite numbers > 0"),
    "text mean": (_data_config(mean="0.5"), r"data_config.mean must be 3 finite numbers"),
    "crop_pct 0": (_data_config(crop_pct=0), r"data_config.crop_pct must be a number in \(0, 1\], got 0"),
    "unknown crop_mode": (_data_config(crop_mode="zoom"), r"data_config.crop_mode must be one of center, squash, border, got 'zoom'"),
    "unknown data_config key": (_data_config(is_training=True), r"data_config has an unknown key 'is_training'"),
    "classes not names": (_put("classes", [1, 2]), r"classes must be a list of class names or null, got \[1, 2\]"),
    "model not tensors": (_put("model", {"neck.0.weight": [1.0]}), r"model must be a state dict \(names to tensors\)"),
    "negative epoch": (_put("epoch", -1), r"epoch must be a whole number >= 0, got -1"),
    "best without a score": (_put("best", {"epoch": 1}), r"best must be \{\} or \{epoch, score, by\}, got \{'epoch': 1\}"),
    "no optimizer": (_drop("optimizer"), r"lacks the field optimizer"),
    "config not a mapping": (_put("config", None), r"config must be a mapping"),
    "backbone_kwargs mltk sets": (_config(backbone_kwargs={"num_classes": 5}), r"backbone_kwargs\['num_classes'\].*mltk sets 'num_classes' itself"),
    "unknown backbone": (_config(backbone="no_such_net"), r"unknown backbone 'no_such_net'"),
}


@pytest.fixture(scope="module")
def evaluate_checkpoint(trained_run):
    """The trained run's best.pt, as torch reads it (to be spoilt one field at a time)."""
    return torch.load(trained_run[0] / "best.pt", weights_only=True)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_bad_checkpoint_field_is_one_line_naming_the_file_and_the_field(case, evaluate_checkpoint, trained_run, mltk_main, tmp_path):
    spoil, expected = CHECKPOINT_CASES[case]
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in evaluate_checkpoint.items()}
    spoil(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*evaluate_args(path, trained_run[1], tmp_path / "eval")))
    assert str(path) in line and re.search(expected, line), line
    assert snapshot(tmp_path) == before
    with pytest.raises(MltkError, match=expected):
        mltk.load(path)


def test_preprocessing_of_other_channels_than_the_model_takes_is_named(evaluate_checkpoint, tmp_path):
    from mltk.config import make_config, to_dict
    from mltk.model import build_embedder

    cfg = make_config({**TINY, "backbone_kwargs": {"in_chans": 1}})
    state = dict(evaluate_checkpoint, config=to_dict(cfg), model=build_embedder(cfg).state_dict())  # weights fit; data_config is RGB
    torch.save(state, tmp_path / "grey.pt")
    with pytest.raises(MltkError, match=r"grey.pt': data_config.input_size has 3 channels, the model takes 1$"):
        mltk.load(tmp_path / "grey.pt")


def test_a_checkpoint_passes_on_only_the_fields_it_knows(evaluate_checkpoint, tmp_path):
    from mltk.model import load_checkpoint, save_checkpoint

    save_checkpoint({**evaluate_checkpoint, "extra": "not mltk's"}, tmp_path / "a.pt")
    state = load_checkpoint(tmp_path / "a.pt")
    assert "extra" not in state and state["epoch"] == evaluate_checkpoint["epoch"]
    slim = {k: evaluate_checkpoint[k] for k in ("config", "data_config", "classes", "model")}  # what mltk index writes
    save_checkpoint(slim, tmp_path / "slim.pt")
    assert set(load_checkpoint(tmp_path / "slim.pt")) == {"format", *slim}
    with pytest.raises(MltkError, match=r"slim.pt' lacks the fields epoch, best, losses, optimizer, scheduler, scaler, sampler, rng"):
        load_checkpoint(tmp_path / "slim.pt", run=True)  # what resuming needs


# --- 3. mltk export: both files or neither; no folder left behind -------------------------------------------------


def test_export_with_a_folder_in_the_way_of_its_sidecar_is_one_line_before_exporting(trained_run, mltk_main, tmp_path, monkeypatch):
    (tmp_path / "m.pt.json").mkdir()
    before = snapshot(tmp_path)
    evaluate_forbid_work(monkeypatch)
    line = one_line_error(mltk_main("export", trained_run[0], "--format", "torchscript", "--out", tmp_path / "m.pt"), code=1)
    assert line == f"error: {str(tmp_path / 'm.pt.json')!r} is a folder; the export writes its preprocessing there (FILE.json): give another --out"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("earlier", [False, True])
def test_export_whose_sidecar_cannot_be_renamed_writes_neither_file(earlier, trained_run, mltk_main, tmp_path, monkeypatch):
    from mltk import export

    if earlier:
        (tmp_path / "m.pt").write_bytes(b"an earlier export")
        (tmp_path / "m.pt.json").write_text("{}")
    before = snapshot(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    line = one_line_error(mltk_main("export", trained_run[0], "--format", "torchscript", "--out", tmp_path / "m.pt"), code=1)
    assert line.startswith("error: Input/output error writing ") and "nothing was written" in line
    assert snapshot(tmp_path) == before  # the earlier file is back, byte for byte; no temporaries


def test_an_export_that_does_not_finish_removes_the_folder_it_made(trained_run, tmp_path, monkeypatch):
    from mltk import export

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while tracing

    monkeypatch.setattr(export, "write_torchscript", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export(trained_run[0], tmp_path / "new" / "sub" / "m.pt", "torchscript")
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        export.export(trained_run[0], tmp_path / "kept" / "m.pt", "torchscript")
    assert snapshot(tmp_path) == {".": "dir", "kept": "dir"}  # the folder it made is gone, the user's stays
    monkeypatch.undo()
    export.export(trained_run[0], tmp_path / "new" / "sub" / "m.pt", "torchscript")  # made when needed, and kept
    assert sorted(p.name for p in (tmp_path / "new" / "sub").iterdir()) == ["m.pt", "m.pt.json"]


# --- 4. Pair lists: the line as it is, CSV reader errors, both kinds of pair --------------------------------------


def test_lfw_error_quotes_the_line_as_it_is_in_the_file(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.txt").write_text("1\nAbel_Pacheco\t1\t4\n  Abel_Pacheco \t x \t4 \n")
    with pytest.raises(MltkError, match=r"pairs.txt, line 3: expected 'name i j' or 'name1 i name2 j', got '  Abel_Pacheco \\t x \\t4 '$"):
        read_pairs(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "header.txt").write_text("10\t300 7\n")
    with pytest.raises(MltkError, match=r"header.txt, line 1: expected a header 'folds n' or 'n', got '10\\t300 7'$"):
        read_pairs(tmp_path / "header.txt", tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('a.png,b.png,1\n"a.png,b.png,1\nc.png,d.png,0\ne.png,f.png,0\n', r"pairs.csv, line 2: a quote opens and is not closed on that line: '\"a.png,b.png,1'$"),
        ("a.png,b.png,1\na.png," + "x" * 200_000 + ",0\n", r"pairs.csv, line 2: not a readable CSV line \(field larger than field limit \(131072\)\): 'a.png,xxx+\.\.\.'$"),
        ("path1,path2,same\n a.png , b.png ,maybe\n", r"pairs.csv, line 2: expected 'path1,path2,same' with same 1/0/true/false, got ' a.png , b.png ,maybe'$"),
    ],
    ids=["unclosed quote", "field too large", "bad same"],
)
def test_csv_pair_list_errors_name_the_line_without_dumping_the_file(text, expected, tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text(text)
    with pytest.raises(MltkError, match=expected) as raised:
        read_pairs(tmp_path / "pairs.csv", tmp_path)
    assert len(str(raised.value)) < 400 and "\n" not in str(raised.value)


def test_a_pair_list_that_is_not_text_names_the_line(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_bytes(b"a.png,b.png,1\nc.png,\xff\xfe.png,0\n")
    with pytest.raises(MltkError, match=r"pairs.csv, line 2: not UTF-8 text; a pair list is a text file$"):
        read_pairs(tmp_path / "pairs.csv", tmp_path)


@pytest.mark.parametrize("same, kind, other", [("1", "matched", "mismatched"), ("0", "mismatched", "matched")])
def test_a_pair_list_of_one_kind_is_one_line_before_embedding(same, kind, other, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    (tmp_path / "pairs.csv").write_text("".join(f"class_0{c}/0.png,class_0{c}/1.png,{same}\n" for c in range(4)))
    import mltk.evaluate

    monkeypatch.setattr(mltk.evaluate, "embed", lambda *a, **k: pytest.fail("embedded before the pair list was checked"))
    line = one_line_error(mltk_main(*evaluate_args(run, folder, tmp_path / "eval", "--pairs", tmp_path / "pairs.csv")), code=1)
    assert line.endswith(f"pairs.csv: every pair is {kind} (4); ROC-AUC, EER, TAR@FAR and accuracy need {other} pairs too")
    assert not (tmp_path / "eval").exists()


def test_a_pair_list_left_with_one_kind_by_unreadable_images_says_so(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text("a.png,b.png,1\nc.png,d.png,0\n")
    pairs = read_pairs(tmp_path / "pairs.csv", tmp_path)
    with pytest.raises(MltkError, match=r"pairs.csv: every pair left once the unreadable images are left out is matched \(1\); .* need mismatched pairs too"):
        pairs.without({tmp_path / "d.png"})


# --- 5. Strings are data: HTML, matplotlib's mathtext, rich markup ------------------------------------------------

MARKUP_NAMES = ["$\\frac{1}{0}$", "<script>alert(1)</script>", "$\\foo{$", "[bold]x[/bold]"]


def test_the_html_report_escapes_every_string(tmp_path):
    from mltk.report import html_report

    page = html_report(
        "mltk evaluate — runs/<b>x</b>", {"recall@1": 0.5, "<i>m</i>": "<script>"},
        {"pair list": "a<script>alert(1)</script>&\x1b[31m.csv"}, {"<img src=x onerror=alert(1)>": b"png"},
    )
    assert "<script>" not in page and "<b>x" not in page and "<i>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;\\x1b[31m.csv" in page and "\x1b" not in page
    assert "runs/&lt;b&gt;x&lt;/b&gt;" in page


def test_class_names_are_drawn_as_they_are_not_as_mathtext(monkeypatch):
    from mltk import report

    figures = []
    real_png = report._png
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or real_png(fig))  # draws it: no parse error
    points, labels = np.random.default_rng(0).normal(size=(8, 2)), np.repeat(np.arange(4), 2)
    png = report.scatter_plot(points, labels, MARKUP_NAMES, "t-SNE")
    assert png.startswith(b"\x89PNG")
    texts = figures[0].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == MARKUP_NAMES and not any(t.get_parse_math() for t in texts)


def test_evaluate_prints_paths_as_they_are_not_as_rich_markup(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "[/bold] [red]eval[/red]"
    code, stdout, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert f"written to {out}: metrics.json" in " ".join(stdout.split())
    assert (out / "metrics.json").is_file()


# --- 6. Numeric options (and the device): one line before any work ------------------------------------------------


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
