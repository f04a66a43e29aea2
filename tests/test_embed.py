"""`mltk embed` (mltk.embed_files): a folder of images, labelled or not, to embeddings.npy and paths.txt, written whole."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image_folder, one_line_error, snapshot


@pytest.fixture(scope="module")
def unlabelled(trained_run, tmp_path_factory) -> Path:
    """Six images with no class folders: four directly in the folder, two in a subfolder that is no class."""
    _, folder = trained_run
    root = tmp_path_factory.mktemp("unlabelled") / "photos"
    (root / "2024").mkdir(parents=True)
    for i, image in enumerate(sorted(folder.glob("class_0[0-2]/*.png"))[:6]):
        shutil.copy(image, root / ("2024" if i >= 4 else "") / f"photo_{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_embed_writes_the_vectors_of_an_unlabelled_folder_with_their_paths(trained_run, unlabelled, mltk_main, tmp_path):
    import mltk

    run, _ = trained_run
    out = tmp_path / "vectors"
    code, stdout, err = mltk_main("embed", run, "--data", unlabelled, "--out", out, "--workers", "0")
    assert code == 0, err
    assert "embedded 6 images (16 dimensions)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "meta.json", "paths.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors"]  # no temporary left beside it
    paths = (out / "paths.txt").read_text(encoding="utf-8").splitlines()
    assert paths == sorted(str(p.resolve()) for p in unlabelled.rglob("*.png"))  # every image, the subfolder's too
    vectors = np.load(out / "embeddings.npy", mmap_mode="r")  # memory-mappable, no pickles
    assert vectors.dtype == np.float32 and vectors.shape == (6, 16)
    model = mltk.load(run, device="cpu")
    np.testing.assert_allclose(vectors, model.embed(paths).numpy(), atol=1e-5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "mltk-embeddings-1" and (meta["count"], meta["dim"], meta["skipped"]) == (6, 16, 0)
    assert meta["model"] == model.fingerprint() and meta["data"] == str(unlabelled.resolve()) and meta["run"] == str(run.resolve())


def test_embed_takes_what_data_takes_and_replaces_its_own_folder(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "vectors"
    assert mltk_main("embed", run, "--data", folder, "--out", out, "--workers", "0")[0] == 0
    assert len((out / "paths.txt").read_text().splitlines()) == 40  # a folder of class folders: every image
    (tmp_path / "list.csv").write_text("path,label\nimages/a.png,x\n")
    make_image_folder(tmp_path / "images", classes=1, per_class=1)
    shutil.move(tmp_path / "images" / "class_00" / "0.png", tmp_path / "images" / "a.png")
    code, stdout, err = mltk_main("embed", run, "--data", tmp_path / "list.csv", "--out", out, "--workers", "0")
    assert code == 0, err
    assert (out / "paths.txt").read_text().splitlines() == [str((tmp_path / "images" / "a.png").resolve())]
    assert np.load(out / "embeddings.npy").shape == (1, 16)


def test_embed_leaves_out_and_lists_unreadable_images(trained_run, unlabelled, mltk_main, tmp_path):
    run, _ = trained_run
    data = Path(shutil.copytree(unlabelled, tmp_path / "photos"))
    (data / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "vectors"
    code, stdout, err = mltk_main("embed", run, "--data", data, "--out", out, "--workers", "0")
    assert code == 0, err
    assert "warning: 1 unreadable images were left out:" in err and "broken.png" in err
    assert "embedded 6 images" in stdout and "skipped_images.txt" in stdout
    assert (out / "skipped_images.txt").read_text().startswith(f"{data / 'broken.png'}\t")
    paths = (out / "paths.txt").read_text().splitlines()
    assert len(paths) == 6 == len(np.load(out / "embeddings.npy")) and not any("broken" in p for p in paths)
    assert json.loads((out / "meta.json").read_text())["skipped"] == 1


def test_embed_refuses_to_replace_what_it_did_not_write(trained_run, unlabelled, mltk_main, tmp_path):
    """mltk replaces only what it wrote, never its own input: each refusal is one line, before the model loads, and the disk is as it was."""
    run, folder = trained_run
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "file.npy").write_bytes(b"mine")
    assert mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--workers", "0")[0] == 0
    assert mltk_main("embed", run, "--data", unlabelled, "--out", tmp_path / "earlier", "--workers", "0")[0] == 0
    (tmp_path / "earlier" / "extra.csv").write_text("mine")
    cases = [
        (tmp_path / "mine", "is a folder that `mltk embed` did not write (it holds 'notes.txt')"),
        (tmp_path / "index", "is a folder that `mltk embed` did not write (it holds 'classes.json', 'embeddings.npy', 'index.faiss' and 4 more)"),
        (tmp_path / "earlier", "was written by `mltk embed` but also holds 'extra.csv', which replacing it would delete"),
        (tmp_path / "file.npy", "is a file, not a folder; give a folder"),
        (unlabelled, "is --data"),
        (unlabelled.parent, "holds --data"),
    ]
    before = snapshot(tmp_path), snapshot(unlabelled.parent)
    for out, message in cases:
        line = one_line_error(mltk_main("embed", run, "--data", unlabelled, "--out", out, "--workers", "0"), 1)
        assert message in line, line
    assert (snapshot(tmp_path), snapshot(unlabelled.parent)) == before


def test_a_failed_embed_leaves_the_earlier_folder_as_it_was(trained_run, unlabelled, mltk_main, tmp_path, monkeypatch):
    import errno

    import mltk.model

    run, _ = trained_run
    out = tmp_path / "vectors"
    assert mltk_main("embed", run, "--data", unlabelled, "--out", out, "--workers", "0")[0] == 0
    before = snapshot(tmp_path)

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mltk.model.EmbeddingModel, "fingerprint", full)  # after the vectors are written aside
    line = one_line_error(mltk_main("embed", run, "--data", unlabelled, "--out", out, "--workers", "0"), 1)
    assert line == f"error: no space left on device writing embeddings folder {str(out)!r}; nothing there was changed"
    assert snapshot(tmp_path) == before  # no temporary left beside it either
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(mltk.model.EmbeddingModel, "fingerprint", interrupted)  # Ctrl-C
    code, stdout, err = mltk_main("embed", run, "--data", unlabelled, "--out", tmp_path / "new" / "vectors", "--workers", "0")
    assert code == 130 and err.splitlines() == [f"interrupted: nothing was written to {str(tmp_path / 'new' / 'vectors')!r} (an earlier embeddings folder there is as it was)"]
    assert snapshot(tmp_path) == before  # the folder made for --out is removed again
