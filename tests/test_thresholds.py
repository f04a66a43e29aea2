"""Calibrated thresholds: operating points read off a ROC, thresholds.json, and how index, search, verify and export carry them."""

import json

import numpy as np
import pytest
from conftest import one_line_error
from sklearn.metrics import roc_curve

from mltk import thresholds
from mltk.errors import MltkError, UsageError
from mltk.metrics import Pairs, evaluate_embeddings

pytestmark = pytest.mark.xdist_group("thresholds")  # its module fixtures are built once, on one worker (pyproject.toml: --dist loadgroup)


def pair_calibration(scores, same, **kw):
    result = evaluate_embeddings(None, pairs=Pairs(np.asarray(scores, np.float32), np.asarray(same, bool)), metrics=["tar_at_far"])
    ev = result.evaluation
    negatives = int((~np.asarray(same, bool)).sum())
    return thresholds.calibrate(ev.roc(), negatives, len(same) - negatives, "sha256:x", "test pairs", **kw)


def test_a_threshold_is_the_lowest_score_whose_false_accept_rate_is_at_most_the_far():
    # 10 negatives and 5 positives, worked by hand: accepting >= 0.7 takes 1 negative (0.75) of 10: FAR 0.1, and
    # the positives 0.9, 0.8, 0.7: TAR 0.6. Lower (0.6) would take a second negative: FAR 0.2 > 0.1.
    neg = [0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    pos = [0.9, 0.8, 0.7, 0.55, 0.35]
    cal = pair_calibration(neg + pos, [False] * 10 + [True] * 5, fars=(0.1, 0.01))
    at_01 = cal.at(0.1)
    assert at_01.threshold == pytest.approx(0.7) and at_01.tar == pytest.approx(0.6) and at_01.far_measured == pytest.approx(0.1)
    assert at_01.false_accepts == 1 and not at_01.reliable  # one false accept: far below the rule of 30
    at_001 = cal.at(0.01)  # no negative may pass: the threshold sits just above 0.75, at the highest positive's 0.8
    assert at_001.threshold == pytest.approx(0.8) and at_001.tar == pytest.approx(0.4) and at_001.false_accepts == 0
    eer = cal.at("eer")
    assert eer.name == "eer" and 0 < eer.far < 0.5
    with pytest.raises(UsageError, match=r"no operating point at FAR 0\.001; the calibration holds FAR 0\.1, FAR 0\.01, eer"):
        cal.at(1e-3)


def test_thresholds_agree_with_scikit_learn_on_random_pairs():
    rng = np.random.default_rng(0)
    same = rng.random(20000) < 0.1
    scores = np.where(same, rng.normal(0.6, 0.15, same.shape), rng.normal(0.1, 0.15, same.shape)).astype(np.float32)
    cal = pair_calibration(scores, same)
    fpr, tpr, cut = roc_curve(same, scores, drop_intermediate=False)
    for far in thresholds.FARS:
        point = cal.at(far)
        best = np.flatnonzero(fpr <= far)[-1]  # scikit-learn's last point within the FAR: the most accepted
        assert point.threshold == pytest.approx(cut[best]) and point.tar == pytest.approx(tpr[best]), far
        accepted = scores >= point.threshold
        assert (accepted & ~same).sum() == point.false_accepts and (accepted & ~same).mean() / (~same).mean() <= far
    assert cal.at(1e-1).reliable and not cal.at(1e-4).reliable  # 18,000 negatives: 1,800 false accepts, and 1 or 2


def test_thresholds_json_is_read_back_and_checked_whole(tmp_path):
    cal = pair_calibration([0.9, 0.1, 0.8, 0.2], [True, False, True, False])
    thresholds.write(cal, tmp_path / "thresholds.json")
    assert thresholds.read(tmp_path) == cal
    good = json.loads((tmp_path / "thresholds.json").read_text())
    broken = {
        "format": ({**good, "format": "other"}, "is not an mltk calibration"),
        "threshold": ({**good, "points": [{**good["points"][0], "threshold": 7.0}]}, r"calibration\['points'\]\[0\]\['threshold'\] must be a cosine score from -1 to 1, or null, got 7.0"),
        "bool count": ({**good, "negatives": True}, r"calibration\['negatives'\] must be a count of at least 1, got True"),
        "extra key": ({**good, "points": [{**good["points"][0], "x": 1}]}, r"unknown key 'x' in calibration\['points'\]\[0\]"),
        "no points": ({**good, "points": []}, r"calibration\['points'\] must be a list of 1 to 100 operating points, got \[\]"),
    }
    for name, (data, message) in broken.items():
        (tmp_path / "thresholds.json").write_text(json.dumps(data))
        with pytest.raises(MltkError, match=message):
            thresholds.read(tmp_path)
    (tmp_path / "thresholds.json").write_text("{not json")
    with pytest.raises(MltkError, match=r"thresholds.json' is not JSON"):
        thresholds.read(tmp_path / "thresholds.json")


def test_thresholds_json_carries_what_it_was_evaluated_on_and_older_files_are_read_as_they_are(tmp_path):
    evaluated = {"data": "faces", "classes_filter": ["s2?"], "data_fingerprint": "sha256:ab", "classes": 10, "checkpoint_epoch": 3}
    cal = pair_calibration([0.9, 0.1, 0.8, 0.2], [True, False, True, False], evaluated=evaluated)
    thresholds.write(cal, tmp_path / "thresholds.json")
    assert thresholds.read(tmp_path).evaluated == evaluated
    older = {k: v for k, v in json.loads((tmp_path / "thresholds.json").read_text()).items() if k != "evaluated"}
    (tmp_path / "thresholds.json").write_text(json.dumps(older))  # as mltk wrote it before it recorded the provenance
    read = thresholds.read(tmp_path)
    assert read.evaluated is None and read.points == cal.points
    (tmp_path / "thresholds.json").write_text(json.dumps({**older, "evaluated": "faces"}))
    with pytest.raises(MltkError, match=r"calibration\['evaluated'\] must be an object \(what the pairs were\), or null, got 'faces'; write it again with `mltk evaluate`"):
        thresholds.read(tmp_path)


@pytest.mark.parametrize("text, expected", [("1e-3", 1e-3), ("0.1", 0.1), ("EER", "eer")])
def test_far_is_a_rate_or_eer(text, expected):
    assert thresholds.parse_far(text) == expected


@pytest.mark.parametrize("text", ["0", "1", "2", "-1e-3", "often", "nan"])
def test_a_far_out_of_range_is_refused(text):
    with pytest.raises(UsageError, match="give a false-accept rate between 0 and 1"):
        thresholds.parse_far(text)


# ---- carried from an evaluation to an index, a search, a verification and an export --------------------------


def assert_same_points(found, expected):
    """The same operating points: the same counts and rates, and thresholds equal but for float rounding (the two sides
    embed the images in different processes, whose kernels may sum in another order: a score moves by about 1e-6)."""
    counts = lambda points: [(p.name, p.far, p.tar, p.far_measured, p.false_accepts, p.reliable) for p in points]  # noqa: E731
    assert counts(found) == counts(expected)
    for a, b in zip(found, expected):
        assert (a.threshold is None) == (b.threshold is None) and (a.threshold is None or abs(a.threshold - b.threshold) < 1e-5), (a, b)


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory):
    """The tiny run, evaluated on all 10 classes (thresholds.json), and an index of it calibrated from that evaluation."""
    from conftest import run_mltk

    run, folder = trained_run
    root = tmp_path_factory.mktemp("calibrated")
    done = run_mltk("evaluate", run, "--data", folder, "--out", root / "eval", "--no-report", "--workers", "0")
    assert done.returncode == 0, done.stderr
    done = run_mltk("index", run, "--data", folder, "--out", root / "index", "--calibrate", root / "eval", "--far", "1e-1", "--workers", "0")
    assert done.returncode == 0, done.stderr
    assert "match threshold at FAR 0.1: threshold" in done.stdout
    return run, folder, root


def test_evaluate_writes_every_operating_point_of_its_pairs(evaluated):
    run, folder, root = evaluated
    cal = thresholds.read(root / "eval")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert [p.name for p in cal.points] == ["far=0.1", "far=0.01", "far=0.001", "far=0.0001", "eer"]
    assert cal.positives + cal.negatives == metrics["pairs"] and cal.positives == metrics["pairs_positive"]
    assert cal.at(1e-1).tar == pytest.approx(metrics["tar@far=0.1"]) and cal.at("eer").far == pytest.approx(metrics["eer"])
    from mltk import load

    assert cal.model == load(run).fingerprint() and not cal.flip_tta
    assert cal.source.startswith("all pairs of")


def test_a_far_too_low_for_the_negatives_is_null_in_metrics_json_and_its_point_stays_unreliable(evaluated):
    _, _, root = evaluated
    cal = thresholds.read(root / "eval")
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert cal.negatives == 720  # 40 images of 10 classes: FAR 0.1 allows 72 false accepts, FAR 0.01 only 7.2
    assert metrics["tar@far=0.1"] is not None and "tar@far=0.1" not in metrics["not_measured"]
    assert metrics["tar@far=0.01"] is None and metrics["not_measured"]["tar@far=0.01"].startswith("720 negative pairs allow 7.2 false accepts at FAR 0.01")
    point = cal.at(1e-2)  # thresholds.json keeps every operating point, flagged by the false accepts it rests on
    assert point.threshold is not None and not point.reliable and point.false_accepts < thresholds.RULE_OF_30
    assert "balanced_accuracy" in metrics and "accuracy" not in metrics  # all pairs: 92 % of them negatives


def test_evaluate_prints_a_dash_and_why_for_a_tar_from_two_negative_pairs(trained_run, tmp_path, mltk_main):
    run, folder = trained_run
    rows = [("class_00/0.png", "class_00/1.png", 1), ("class_01/0.png", "class_01/1.png", 1), ("class_02/0.png", "class_02/1.png", 1),
            ("class_03/0.png", "class_03/1.png", 1), ("class_00/2.png", "class_05/0.png", 0), ("class_01/2.png", "class_06/0.png", 0)]
    (tmp_path / "pairs.csv").write_text("".join(f"{a},{b},{same}\n" for a, b, same in rows))
    code, out, err = mltk_main("evaluate", run, "--data", folder, "--pairs", tmp_path / "pairs.csv", "--out", tmp_path / "eval", "--no-report", "--workers", "0")
    assert code == 0, err
    rows = [line for line in out.splitlines() if "│" in line and ("1e-4" in line or "0.0001" in line)]  # the table's TAR@FAR=1e-4
    assert rows and all("–" in row and "1.0000" not in row for row in rows), out
    assert "tar@far=0.0001: – (2 negative pairs allow 0.0002 false accepts at FAR 0.0001" in " ".join(out.split())
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["tar@far=0.0001"] is None and "it takes 300,000 negative pairs" in metrics["not_measured"]["tar@far=0.0001"]
    points = json.loads((tmp_path / "eval" / "thresholds.json").read_text())["points"]
    assert [p["reliable"] for p in points] == [False] * 5  # two negatives: no point rests on 30 false accepts


def test_search_marks_hits_below_the_threshold_as_no_match(evaluated, mltk_main, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # nothing wraps, however long the temporary folder's path
    run, folder, root = evaluated
    meta = json.loads((root / "index" / "meta.json").read_text())
    threshold = thresholds.from_json(meta["calibration"]).at(1e-1).threshold
    assert meta["operating_point"] == "far=0.1"
    queries = sorted(folder.glob("class_0*/*.png"))[:6]
    code, out, err = mltk_main("search", root / "index", *queries, "--k", "3", "--json")
    assert code == 0, err
    results = json.loads(out)
    for result in results:
        assert result["threshold"] == {"score": pytest.approx(threshold), "operating_point": "far=0.1"}
        assert [n["match"] for n in result["neighbours"]] == [n["score"] >= threshold for n in result["neighbours"]]
        assert result["match"] == any(n["match"] for n in result["neighbours"])
    # Another operating point of the same calibration: a stricter threshold marks fewer hits as matches.
    code, out, _ = mltk_main("search", root / "index", *queries, "--k", "3", "--json", "--far", "1e-4")
    strict = json.loads(out)
    assert strict[0]["threshold"]["operating_point"] == "far=0.0001" and strict[0]["threshold"]["score"] >= threshold
    code, out, _ = mltk_main("search", root / "index", queries[0], "--k", "2")
    header = next(line for line in out.splitlines() if "rank" in line)
    assert code == 0 and ("  match (threshold" in out or "  no match (threshold" in out) and "match" in header


def test_verify_answers_same_or_different_with_the_score_and_threshold(evaluated, mltk_main):
    run, folder, root = evaluated
    from mltk import load

    model = load(run)
    a, b, c = sorted(folder.glob("class_00/*.png"))[0], sorted(folder.glob("class_00/*.png"))[1], sorted(folder.glob("class_05/*.png"))[0]
    threshold = thresholds.read(root / "eval").at(1e-3).threshold
    for other in (b, c):
        score = float(model.embed([a])[0] @ model.embed([other])[0])
        code, out, err = mltk_main("verify", a, other, "--run", run, "--calibrate", root / "eval", "--json")
        assert code == 0, err
        verdict = json.loads(out)
        assert verdict["score"] == pytest.approx(score, abs=1e-5) and verdict["threshold"] == pytest.approx(threshold)
        assert verdict["same"] == (score >= threshold) and verdict["operating_point"] == "far=0.001"
    code, out, _ = mltk_main("verify", a, b, "--index", root / "index")  # the index's model and threshold (FAR 0.1)
    assert code == 0 and out.startswith(("same: score", "different: score")) and "at FAR 0.1, calibrated on all pairs of" in out


def test_export_carries_the_threshold_in_its_sidecar(evaluated, tmp_path, mltk_main):
    run, folder, root = evaluated
    code, out, err = mltk_main("export", run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--calibrate", root / "eval", "--far", "eer")
    assert code == 0, err
    sidecar = json.loads((tmp_path / "m.pt.json").read_text())
    eer = thresholds.read(root / "eval").at("eer")
    assert sidecar["threshold"] == {"score": eer.threshold, "operating_point": "eer"}
    assert thresholds.from_json(sidecar["calibration"]).at("eer") == eer
    assert "match threshold" in out


def test_calibration_from_images_equals_the_evaluation_of_them(evaluated, tmp_path, mltk_main):
    run, folder, root = evaluated
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--calibrate", folder, "--workers", "0")
    assert code == 0, err
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    found, expected = thresholds.from_json(meta["calibration"]), thresholds.read(root / "eval")
    assert (found.positives, found.negatives, found.model, found.flip_tta) == (expected.positives, expected.negatives, expected.model, expected.flip_tta)
    assert_same_points(found.points, expected.points)  # the same pairs, the same points
    assert meta["operating_point"] == "far=0.001"


def test_wrong_calibrations_are_one_line_and_write_nothing(evaluated, tmp_path, mltk_main, trained_run):
    run, folder, root = evaluated
    other = tmp_path / "other"
    other.mkdir()
    cal = json.loads((root / "eval" / "thresholds.json").read_text())
    (other / "thresholds.json").write_text(json.dumps({**cal, "model": "sha256:0000"}))
    cases = [
        (["index", run, "--data", folder, "--out", tmp_path / "i1", "--calibrate", other], "was calibrated on another model"),
        (["index", run, "--data", folder, "--out", tmp_path / "i2", "--far", "1e-3"], "--far picks an operating point of --calibrate"),
        (["index", run, "--data", folder, "--out", tmp_path / "i3", "--calibrate", root / "eval", "--far", "5e-3"], "no operating point at FAR 0.005"),
        (["index", run, "--data", folder, "--out", tmp_path / "i4", "--calibrate", root / "eval", "--far", "2"], "give a false-accept rate between 0 and 1"),
        (["verify", folder / "class_00" / "0.png", folder / "class_00" / "1.png"], "give --run RUN or --index DIR"),
        (["verify", folder / "class_00" / "0.png", folder / "nothere.png", "--index", root / "index"], "nothere.png' cannot be read: does not exist"),
        (["export", run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--calibrate", other], "was calibrated on another model"),
    ]
    for args, message in cases:
        line = one_line_error(mltk_main(*args))
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]
    # An index without a threshold: search has no --far to choose, verify no threshold to use.
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "plain", "--workers", "0")
    assert code == 0, err
    assert "has no calibrated threshold, so --far" in one_line_error(mltk_main("search", tmp_path / "plain", folder / "class_00" / "0.png", "--far", "1e-3"))
    assert "has no calibrated threshold; give --calibrate" in one_line_error(mltk_main("verify", folder / "class_00" / "0.png", folder / "class_00" / "1.png", "--index", tmp_path / "plain"))
    code, out, _ = mltk_main("search", tmp_path / "plain", folder / "class_00" / "0.png", "--json")
    assert code == 0 and json.loads(out)[0]["match"] is None and json.loads(out)[0]["neighbours"][0]["match"] is None


def test_a_tampered_threshold_in_meta_json_is_refused(evaluated, tmp_path, mltk_main):
    import shutil

    run, folder, root = evaluated
    shutil.copytree(root / "index", tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    for bad, message in (({"operating_point": "far=0.5"}, "operating_point='far=0.5', not a point"), ({"calibration": {"format": "x"}}, "meta.json is not an mltk calibration")):
        (tmp_path / "index" / "meta.json").write_text(json.dumps({**meta, **bad}))
        line = one_line_error(mltk_main("search", tmp_path / "index", folder / "class_00" / "0.png"))
        assert "is damaged: meta.json" in line and message in line, line


def test_a_forged_or_implausible_operating_point_is_refused(tmp_path):
    cal = pair_calibration([0.9, 0.1, 0.8, 0.2], [True, False, True, False])
    thresholds.write(cal, tmp_path / "thresholds.json")
    good = json.loads((tmp_path / "thresholds.json").read_text())
    point = next(p for p in good["points"] if p["name"] == "far=0.001")
    forged = {**point, "threshold": -1.0, "tar": 1.0}  # a threshold of -1 would make every hit a match
    broken = {
        "a second point of one name": ({**good, "points": [forged, *good["points"]]}, "calibration has two operating points named 'far=0.001'"),
        "a threshold above any cosine": ({**good, "points": [{**point, "threshold": 1.01}]}, r"\['threshold'\] must be a cosine score from -1 to 1, or null, got 1.01"),
        "a threshold below any cosine": ({**good, "points": [{**point, "threshold": -1.5}]}, r"\['threshold'\] must be a cosine score from -1 to 1, or null, got -1.5"),
        "a name that is not its far": ({**good, "points": [{**point, "name": "far=0.1"}]}, r"calibration\['points'\]\[0\]\['name'\] must be 'eer' or 'far=0.001' \(its far\), got 'far=0.1'"),
    }
    for name, (data, message) in broken.items():
        (tmp_path / "thresholds.json").write_text(json.dumps(data))
        with pytest.raises(MltkError, match=message):
            thresholds.read(tmp_path)
    # A cosine of unit float32 vectors may pass 1 or -1 by rounding: still a threshold.
    (tmp_path / "thresholds.json").write_text(json.dumps({**good, "points": [{**point, "threshold": 1.0000001}, {**point, "name": "eer", "threshold": -1.0}]}))
    assert [p.threshold for p in thresholds.read(tmp_path).points] == [1.0000001, -1.0]


def test_a_thresholds_json_that_is_a_folder_or_too_large_is_said_as_such(tmp_path):
    (tmp_path / "eval" / "thresholds.json").mkdir(parents=True)
    for given in (tmp_path / "eval", tmp_path / "eval" / "thresholds.json"):
        with pytest.raises(MltkError, match=r"thresholds.json' is a folder, not a thresholds.json; give the thresholds.json that `mltk evaluate` writes"):
            thresholds.read(given)
    (tmp_path / "big.json").write_text(" " * thresholds.MAX_BYTES + "{}")
    with pytest.raises(MltkError, match=r"big.json' is larger than 1 MiB, and a thresholds.json holds a few kilobytes"):
        thresholds.read(tmp_path / "big.json")


def image_list(folder, tmp_path, classes):
    """A CSV path,label list of the images of ``classes``, copied beside it (a CSV names images inside its folder)."""
    import shutil

    rows = ["path,label"]
    for name in classes:
        shutil.copytree(folder / name, tmp_path / "images" / name)
        rows += [f"images/{name}/{image.name},{name}" for image in sorted((tmp_path / "images" / name).glob("*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "list.csv"


def test_calibrate_takes_a_csv_list_of_images_as_data_does(evaluated, tmp_path, mltk_main):
    run, folder, root = evaluated
    listed = image_list(folder, tmp_path, sorted(p.name for p in folder.iterdir() if p.is_dir()))
    code, out, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--calibrate", listed, "--workers", "0")
    assert code == 0, err
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert_same_points(thresholds.from_json(meta["calibration"]).points, thresholds.read(root / "eval").points)  # the same images, the same points
    a, b = folder / "class_00" / "0.png", folder / "class_00" / "1.png"
    code, out, err = mltk_main("verify", a, b, "--run", run, "--calibrate", listed, "--json")
    assert code == 0 and json.loads(out)["calibrated_on"] == "all pairs of list", err
    code, out, err = mltk_main("export", run, "--format", "torchscript", "--out", tmp_path / "m.pt", "--calibrate", listed)
    assert code == 0 and json.loads((tmp_path / "m.pt.json").read_text())["calibration"]["source"] == "all pairs of list", err


def test_calibration_images_of_one_class_are_refused_naming_calibrate(evaluated, tmp_path, mltk_main):
    run, folder, root = evaluated
    listed = image_list(folder, tmp_path, ["class_03"])
    message = "the calibration images need at least two classes, one of them with two images or more: a threshold is read off matched pairs"
    for source in (listed, tmp_path / "images"):
        line = one_line_error(mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--calibrate", source, "--workers", "0"), 1)
        assert line.startswith(f"error: --calibrate {str(source)!r}: ") and message in line and "tar_at_far" not in line, line
    line = one_line_error(mltk_main("verify", folder / "class_00" / "0.png", folder / "class_00" / "1.png", "--run", run, "--calibrate", listed), 1)
    assert message in line, line
    assert not (tmp_path / "index").exists()


def test_a_full_disk_while_writing_thresholds_json_keeps_the_earlier_evaluation(evaluated, tmp_path, mltk_main, monkeypatch):
    import errno

    run, folder, root = evaluated
    code, _, err = mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--no-report", "--workers", "0", "--metrics", "tar_at_far")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()}

    def full(calibration, path):
        path.write_text('{"format": "mltk-thr')  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(thresholds, "write", full)
    line = one_line_error(mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--no-report", "--workers", "0", "--metrics", "tar_at_far,eer"), 1)
    assert line.startswith("error: no space left on device writing ") and "is as it was" in line, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporary left beside it
