"""mltk compare: the experiment table of real runs, on the terminal, as Markdown and as an HTML page; strings from
the run directories shown as data; a bad run directory or --out is one line and writes nothing."""

import json
import os
import re
import shutil

import pytest
import yaml
from conftest import TINY, make_image_folder, one_line_error, snapshot

from mltk.compare import shell_word

METRIC_KEYS = {"ROC-AUC": "roc_auc", "TAR@FAR=1e-3": "tar@far=0.001", "recall@1": "recall@1", "recall@4": "recall@4", "map@r": "map@r", "MAP@R": "map@r"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny real runs differing in held-out classes, dim, loss and epochs: a and b evaluated (b twice: an older
    evaluation of ROC-AUC only in b/eval, a newer one of every metric in b/full), c not, and c has no validation data."""
    from mltk import evaluate as ev
    from mltk.config import make_config
    from mltk.model import load
    from mltk.train import train

    root = tmp_path_factory.mktemp("compare")
    folder = make_image_folder(root / "images", classes=10, per_class=4)
    changes = {"a": {"val_classes": 0.3}, "b": {"val_classes": 0.3, "dim": 8, "epochs": 2}, "c": {"loss": "ce", "epochs": 2}}
    for name, change in changes.items():
        train(make_config({**TINY, "data": str(folder), **change}), root / name)
    for name, out, metrics, age in (("a", "eval", None, 0), ("b", "eval", ["roc_auc"], 100), ("b", "full", None, 0)):
        model = load(root / name, "cpu")
        result = ev.evaluate(model, data=ev.held_out_data(model), metrics=metrics, workers=0)
        with ev.output_folder(root / name / out) as written:
            ev.write_outputs(result, written, save_embeddings=False)
        stamp = (root / name / out / "metrics.json").stat().st_mtime - age  # b/eval the older of b's two
        os.utime(root / name / out / "metrics.json", (stamp, stamp))
    return root


def markdown_rows(text: str) -> list[list[str]]:
    """The cells of a Markdown pipe table (header first, the alignment row left out); ``\\|`` is not a border."""
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set("".join(row)) <= set(":- ")]


def shown_metric(value) -> str:
    """A metric as the table writes it: 4 places, or – for null (a TAR@FAR its negatives cannot measure)."""
    return "–" if value is None else f"{value:.4f}"


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_table_shows_each_run_the_settings_they_differ_in_and_the_latest_metrics(runs, mltk_main, monkeypatch):
    monkeypatch.chdir(runs)  # run names as a user types them
    code, out, err = mltk_main("compare", "a", "b", "c", "--out", "table.md", "--out", "table.html")
    assert code == 0, err
    header, *rows = markdown_rows((runs / "table.md").read_text())
    assert header == ["run", "val_classes", "dim", "loss", "epochs", "train time", "images/s", "best epoch", "ROC-AUC", "TAR@FAR=1e-3", "recall@1", "recall@4", "MAP@R"]
    assert [row[0] for row in rows] == ["a", "b", "c"]  # out, workers and device differ too (out always): not columns
    plain = [[cell.strip("*") for cell in row] for row in rows]
    assert [row[1:5] for row in plain] == [["0.3", "16", "arcface", "1"], ["0.3", "8", "arcface", "2"], ["0", "16", "ce", "2"]]

    # training: seconds summed, images over seconds, best epoch by val recall@1 (a, b) or by the lowest loss (c)
    for row, name in zip(plain, "abc"):
        history = records(runs / name)
        seconds = sum(r["seconds"] for r in history)
        assert row[5] == f"{seconds:.1f} s"
        assert float(row[6].replace(",", "")) == pytest.approx(sum(r["images_per_s"] * r["seconds"] for r in history) / seconds, rel=0.01, abs=0.06)
        score = (lambda r: r["val_recall@1"]) if name != "c" else (lambda r: -r["loss"])
        assert row[7] == str(max(history, key=score)["epoch"])

    # metrics: a's evaluation, b's newest (b/full, not the older b/eval of ROC-AUC only), none for c
    latest = {"a": json.loads((runs / "a" / "eval" / "metrics.json").read_text()), "b": json.loads((runs / "b" / "full" / "metrics.json").read_text())}
    for row, name in zip(plain[:2], "ab"):
        assert row[8:] == [shown_metric(latest[name][METRIC_KEYS[h]]) for h in header[8:]]
    assert plain[2][8:] == ["–"] * 5
    assert "`mltk evaluate c --data DATA`" in (runs / "table.md").read_text()  # c held nothing out: it needs images

    # the best of each measured column in bold: ties all, the lowest train time, the highest of the rest
    for c in [5, 6, *range(8, 13)]:
        values = {r: float(row[c].split()[0].replace(",", "")) for r, row in enumerate(plain) if row[c] != "–"}
        best = (min if c == 5 else max)(values.values(), default=None)
        bold = {r for r, row in enumerate(rows) if row[c].startswith("**") and row[c].endswith("**")}
        assert bold == {r for r, v in values.items() if v == best}, header[c]
    assert not any(row[c].startswith("**") for row in rows for c in (0, 1, 2, 3, 4, 7))

    page = (runs / "table.html").read_text()
    assert page.count("<tr>") == 4 and 'class="number best"' in page and "<code>mltk evaluate c --data DATA</code>" in page
    assert re.search(r'<h2>Training curves</h2><img alt="Training curves" src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}">', page)
    assert "src=\"http" not in page and page.count("<script") == 1  # self-contained: its one script sorts the columns
    assert "mltk evaluate c --data DATA" in out and "written: table.md, table.html" in " ".join(out.split())


def test_strings_from_run_directories_are_data_not_markup(runs, mltk_main, tmp_path):
    """A run named like markup, holding a config value like markup: shown as typed, in rich, Markdown, HTML and the plot."""
    odd = tmp_path / "[red]run $x^{ <script>"
    shutil.copytree(runs / "a", odd)
    config = yaml.safe_load((odd / "config.yaml").read_text())
    (odd / "config.yaml").write_text(yaml.safe_dump({**config, "val_data": "held|out <b>x</b> *y* [red]z", "val_classes": 0.0}))
    (odd / "eval" / "metrics.json").write_text(json.dumps({"roc_auc": 0.5}))  # an evaluation of ROC-AUC only
    code, out, err = mltk_main("compare", runs / "a", odd, "--out", tmp_path / "t.md", "--out", tmp_path / "t.html")
    assert code == 0, err
    assert "[red]run $x^{ <script>" in out and "[red]z" in out  # rich printed them, not read them as markup

    text = (tmp_path / "t.md").read_text()
    header, *rows = markdown_rows(text)
    assert len({len(row) for row in [header, *rows]}) == 1  # a | in a value is not a cell border
    assert "\\[red\\]run \\$x^{ \\<script\\>" in text and "held\\|out \\<b\\>x\\</b\\> \\*y\\* \\[red\\]z" in text
    assert "<script" not in text.replace("\\<script", "") and "<b>" not in text
    assert header[1:3] == ["val_data", "val_classes"]
    assert rows[1][-5] == "0.5000" and rows[1][-4:] == ["–"] * 4 and "recall@1" in text.split("|")[-1]  # the note: not in its evaluation

    page = (tmp_path / "t.html").read_text().replace("<wbr>", "")  # the line-break opportunities in long names aside
    assert "&lt;script&gt;" in page and page.count("<script") == 1 and "&lt;b&gt;x&lt;/b&gt;" in page and "<b>" not in page  # its own script only
    assert "Training curves" in page  # the legend drew '$x^{' as text: mathtext would have failed on it


BAD = {  # case -> what its error line says
    "not a run": "is not a run directory: it has no config.yaml",
    "no such folder": "is not a run directory: there is no such folder",
    "corrupt metrics.json": "metrics.json' is not valid JSON",
    "metrics.json out of range": "roc_auc must be a number from 0 to 1 or null, got 7",
    "metrics.json of a newer mltk": "is a metrics.json of format 'mltk-metrics-9', not mltk-metrics-2: a newer mltk wrote it",
    "provenance out of range": "evaluated.training_classes_evaluated must be a count or null, got -3",
    "corrupt metrics.jsonl": "metrics.jsonl' line 1: loss must be a finite number (a float32: what training computes), got '<b>'",
    "bad config.yaml": "dim in config file",
    "foreign --out": "exists and is not a table mltk compare wrote",
    "--out .txt": "give a file name ending in .md (Markdown) or .html",
    "run twice": "is given twice",
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(runs, mltk_main, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(runs / "a", run)
    args, out = [runs / "b", run], tmp_path / "t.md"
    if case == "not a run":
        args.append(runs / "images")
    elif case == "no such folder":
        args.append(tmp_path / "missing")
    elif case == "corrupt metrics.json":
        (run / "eval" / "metrics.json").write_text('{"roc_auc": 0.9, ')
    elif case == "metrics.json out of range":
        (run / "eval" / "metrics.json").write_text('{"roc_auc": 7}')
    elif case == "metrics.json of a newer mltk":
        (run / "eval" / "metrics.json").write_text('{"format": "mltk-metrics-9", "roc_auc": 0.9}')
    elif case == "provenance out of range":
        written = json.loads((run / "eval" / "metrics.json").read_text())
        (run / "eval" / "metrics.json").write_text(json.dumps({**written, "evaluated": {**written["evaluated"], "training_classes_evaluated": -3}}))
    elif case == "corrupt metrics.jsonl":  # a broken line before the last: not a run being written
        (run / "metrics.jsonl").write_text('{"epoch": 1, "loss": "<b>"}\n' + (run / "metrics.jsonl").read_text())
    elif case == "bad config.yaml":
        (run / "config.yaml").write_text("dim: [red]\n")
    elif case == "foreign --out":
        out.write_text("my notes\n")
    elif case == "--out .txt":
        out = tmp_path / "t.txt"
    elif case == "run twice":
        args.append(runs / "b")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("compare", *args, "--out", out, "--out", tmp_path / "t.html"))
    assert BAD[case] in line
    assert snapshot(tmp_path) == before, line


RECORDS = {  # metrics.jsonl lines of finite numbers that no run writes -> the error after the file's name
    "seconds summing past the float limit": ('{"epoch": 1, "seconds": 1e308}\n{"epoch": 2, "seconds": 1e308}\n', "line 1: seconds must be a number in [0, 1e8] (an epoch's seconds), got 1e+308"),
    "an epoch of 400 digits": ('{"epoch": 1' + "0" * 399 + ', "loss": 1.0}\n', "line 1 is not an epoch record after the one before it (an object with epoch 1 to 10000); it is not a metrics.jsonl mltk run wrote"),
    "negative seconds": ('{"epoch": 1, "loss": 1.0, "seconds": -5, "images_per_s": 10}\n', "line 1: seconds must be a number in [0, 1e8] (an epoch's seconds), got -5"),
    "negative images/s": ('{"epoch": 1, "loss": 1.0, "seconds": 5, "images_per_s": -7}\n', "line 1: images_per_s must be a number in [0, 1000000000], got -7"),
    "a loss past float32": ('{"epoch": 1, "loss": 1e300}\n', "line 1: loss must be a finite number (a float32: what training computes), got 1e+300"),
    "a recall past 1": ('{"epoch": 1, "loss": 1.0, "val_recall@1": 2}\n', "line 1: val_recall@1 must be a number in [0, 1], got 2"),
}


@pytest.mark.parametrize("case", RECORDS)
def test_a_record_no_run_writes_is_one_error_line_not_a_crash_or_a_best_value(runs, mltk_main, tmp_path, case):
    """Values that overflowed a sum or a plot axis (a traceback), or would have been marked best (negative seconds)."""
    run = tmp_path / "run"
    shutil.copytree(runs / "c", run)
    text, expected = RECORDS[case]
    (run / "metrics.jsonl").write_text(text)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("compare", runs / "a", run, "--out", tmp_path / "t.md", "--out", tmp_path / "t.html"), code=1)
    assert line == f"error: {str(run / 'metrics.jsonl')!r} {expected}"
    assert snapshot(tmp_path) == before


def test_the_extremes_a_run_can_record_are_drawn_without_a_warning(runs, mltk_main, tmp_path):
    """At the edges of each range (float32's loss, 10000 epochs of 1e8 s): the sums are finite and matplotlib's axes,
    which overflowed past them with a RuntimeWarning printed on the terminal, draw quietly."""
    import warnings

    run = tmp_path / "run"
    shutil.copytree(runs / "c", run)
    edges = [(1, -3.4e38, 0.0, 0.0), (2, 1e-320, 1e8, 1e9), (10_000, 3.4e38, 1e8, 1e9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e, "loss": loss, "seconds": s, "images_per_s": rate, "val_recall@1": 1e-320}) + "\n" for e, loss, s, rate in edges))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = mltk_main("compare", runs / "a", run, "--out", tmp_path / "t.md", "--out", tmp_path / "t.html")
    assert code == 0, err
    assert [str(w.message) for w in caught] == [] and "Warning" not in err
    row = markdown_rows((tmp_path / "t.md").read_text())[2]
    assert [cell.strip("*") for cell in row[-8:-5]] == ["55555 h 33 min", "1,000,000,000", "1"]  # 2e8 s; images over seconds; the first of equal recalls
    assert '<img alt="Training curves"' in (tmp_path / "t.html").read_text()


def test_a_run_name_of_control_characters_is_shown_escaped_in_a_command_that_still_names_it(runs, mltk_main, tmp_path):
    """The suggested ``mltk evaluate`` names the folder in bash's $'...' quoting: no escape sequence reaches the
    terminal, Markdown or HTML, and pasted, it names the folder."""
    import subprocess

    run = tmp_path / "odd\x1b[31m\nname's"
    shutil.copytree(runs / "c", run)
    code, out, err = mltk_main("compare", run, "--out", tmp_path / "t.md", "--out", tmp_path / "t.html")
    assert code == 0, err
    command = f"mltk evaluate $'{tmp_path}/odd\\x1b[31m\\nname\\'s' --data DATA"
    assert "\x1b" not in out and command in out
    assert command.replace("|", "\\|") in (tmp_path / "t.md").read_text()
    assert f"<code>{command.replace(chr(39), '&#x27;')}</code>" in (tmp_path / "t.html").read_text()
    word = command.split(" ")[2]
    assert subprocess.run(["bash", "-c", f"printf %s {word}"], capture_output=True, text=True).stdout == str(run)


def test_a_full_disk_while_writing_the_pages_is_one_line_and_leaves_the_earlier_pages(runs, mltk_main, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    outs = ("--out", tmp_path / "t.md", "--out", tmp_path / "t.html")
    code, _, err = mltk_main("compare", runs / "a", runs / "c", *outs)
    assert code == 0, err
    before, write_text = snapshot(tmp_path), Path.write_text

    def full(self, text, *args, **kwargs):  # the Markdown fits; the page fills the disk halfway through
        if self.name.startswith(".t.html"):
            write_text(self, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    code, out, err = mltk_main("compare", runs / "a", runs / "b", *outs)
    assert code == 1 and "MAP@R" in out  # the table is on the terminal all the same
    assert err.strip() == f"error: no space left on device writing {str(tmp_path / 't.html')!r}; nothing was written (a file there earlier is as it was)"
    assert snapshot(tmp_path) == before  # both pages as they were, no temporary left


def test_an_earlier_table_is_replaced_a_cut_line_left_out_and_a_stale_evaluation_named(runs, mltk_main, tmp_path):
    run, retrained = tmp_path / "run", tmp_path / "retrained"
    shutil.copytree(runs / "c", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "lo')  # a run writing its next line
    shutil.copytree(runs / "a", retrained)
    later = (retrained / "eval" / "metrics.json").stat().st_mtime + 60
    os.utime(retrained / "last.pt", (later, later))  # trained again after its evaluation, which scored last.pt
    for _ in range(2):  # the second replaces the first's file: mltk compare wrote it
        code, out, err = mltk_main("compare", run, retrained, "--out", tmp_path / "t.md")
        assert code == 0, err
    text = (tmp_path / "t.md").read_text()
    rows = markdown_rows(text)[1:]
    assert rows[0][-6].strip("*") == str(min(records(runs / "c"), key=lambda r: r["loss"])["epoch"])  # best epoch: of the epochs whole
    assert f"older than its checkpoint (trained again since); to bring it up to date: `mltk evaluate {retrained}`" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrained", "run", "t.md"]  # no temporary left


def test_evaluate_report_shows_the_run_config_and_curves(runs):
    """The report of a model from a run directory gains the run's configuration and training curves; of a bare
    backbone, neither."""
    from mltk import evaluate as ev
    from mltk.report import html_report

    config, history = ev.training_of(runs / "b" / "best.pt")  # a checkpoint in a run directory: that run's
    assert config["dim"] == 8 and [r["epoch"] for r in history] == [1, 2]
    assert ev.training_of(runs / "images") is None
    page = html_report("t", {"roc_auc": 0.5}, {}, {}, config={**config, "data": "<i>x</i>"})
    assert "<h2>Configuration</h2>" in page and "<td>dim</td><td>8</td>" in page and "&lt;i&gt;x&lt;/i&gt;" in page
    assert "Configuration" not in html_report("t", {"roc_auc": 0.5}, {}, {})


def evaluation_like(runs, tmp_path, name: str, of: str, **changes) -> None:
    """A copy of run ``of`` as ``name``, its metrics.json's provenance changed (and its metrics the best of all)."""
    shutil.copytree(runs / of, tmp_path / name)
    path = tmp_path / name / "eval" / "metrics.json"
    written = json.loads(path.read_text())
    best = {key: 1.0 for key in METRIC_KEYS.values() if key in written}
    path.write_text(json.dumps({**written, **best, "evaluated": {**written["evaluated"], **changes}}))


def test_a_run_evaluated_on_its_training_classes_is_flagged_and_never_marked_best(runs, mltk_main, tmp_path):
    """Such a run's figures say how well it learnt those classes: shown, said loudly, and left out of the ranking."""
    evaluation_like(runs, tmp_path, "seen", "a", training_classes_evaluated=7, classes=10)
    evaluation_like(runs, tmp_path, "chosen", "b", checkpoint_chosen_on_evaluated_classes=True)
    code, out, err = mltk_main("compare", runs / "a", tmp_path / "seen", tmp_path / "chosen", runs / "b", "--out", tmp_path / "t.md")
    assert code == 0, err
    text = (tmp_path / "t.md").read_text()
    header, *rows = markdown_rows(text)
    metrics = range(len(header) - 5, len(header))
    assert [cell for cell in rows[1][-5:]] == ["1.0000"] * 5  # the highest, not marked
    assert not any(rows[r][c].startswith("**") for r in (1, 2) for c in metrics)
    for c in metrics:  # a and b, evaluated on the same held-out images, are ranked between themselves
        values = {r: float(rows[r][c].strip("*")) for r in (0, 3) if rows[r][c] != "–"}
        top = max(values.values(), default=None) if len(values) > 1 else None
        assert {r for r in (0, 3) if rows[r][c].startswith("**")} == {r for r, v in values.items() if v == top}, header[c]
    seen, chosen = shell_word(str(tmp_path / "seen")), shell_word(str(tmp_path / "chosen"))
    said = " ".join(out.split())
    assert (f"not ranked: {tmp_path / 'seen'} was evaluated on 7 of its own training classes (of the 10 it scored): its metrics say how well "
            f"it learnt them, not how it does on new classes; to evaluate it on classes it did not learn from, with last.pt: mltk evaluate {seen}") in said
    assert f"not ranked: {tmp_path / 'chosen'}'s evaluation scored best.pt, chosen by validation recall@1 on the very classes it scored" in said
    assert f"`mltk evaluate {chosen}`" in text


def test_runs_evaluated_on_different_images_are_not_ranked(runs, mltk_main, tmp_path):
    """Figures of different images do not compare: no metric is marked, and the note says which run scored what.
    An evaluation from before mltk recorded its images (the flat metrics.json, still read) is one of them."""
    evaluation_like(runs, tmp_path, "other", "b", data_fingerprint="sha256:other", data="birds", classes=100, images=5794)
    shutil.copytree(runs / "b", tmp_path / "older")
    written = json.loads((tmp_path / "older" / "full" / "metrics.json").read_text())
    flat = {key: value for key, value in written.items() if key not in ("format", "evaluated")}
    (tmp_path / "older" / "full" / "metrics.json").write_text(json.dumps(flat))
    for others in (["other"], ["older"]):
        code, out, err = mltk_main("compare", runs / "a", *(tmp_path / name for name in others), "--out", tmp_path / "t.md")
        assert code == 0, err
        text = (tmp_path / "t.md").read_text()
        header, *rows = markdown_rows(text)
        assert rows[1][-5:] == [shown_metric(flat[METRIC_KEYS[h]]) for h in header[-5:]] if others == ["older"] else ["1.0000"] * 5  # read, shown
        assert not any(cell.startswith("**") for row in rows for cell in row[-5:])
        said = " ".join(out.split())
        assert "not ranked: no metric, since the runs were evaluated on different images (" in said
    assert f"{tmp_path / 'older'} on images not recorded (an earlier mltk evaluated it)" in said
    code, out, err = mltk_main("compare", runs / "a", tmp_path / "other", "--out", tmp_path / "t.md")
    assert f"{tmp_path / 'other'} on birds (100 classes, 5794 images)); evaluate them all on the same images to rank them: mltk evaluate RUN --data DATA" in " ".join(out.split())
