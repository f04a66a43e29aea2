"""mltk data fetch: torchvision's Omniglot laid out as <class>/<image>, written whole or not at all; one line without
network, and "bring your own" for the datasets no library downloads. The network is never used: torchvision's
download is replaced by a copy of a tiny archive in torchvision's own format."""

import hashlib
import json
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from mltk.data import load_data

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/images_background.zip"
CHARACTERS = {"Greek": ["character01", "character02"], "Latin": ["character01"]}


@pytest.fixture
def archive(tmp_path_factory):
    """images_background.zip as the Omniglot repository has it: images_background/<Alphabet>/<characterNN>/<id>_<drawer>.png."""
    root = tmp_path_factory.mktemp("archive")
    path = root / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, characters in CHARACTERS.items():
            for c, character in enumerate(characters):
                for drawer in (1, 2):
                    image = root / "x.png"
                    Image.new("1", (105, 105), color=drawer % 2).save(image)
                    zf.write(image, f"images_background/{alphabet}/{character}/{c:04d}_{drawer:02d}.png")
    return path


@pytest.fixture
def downloads(archive, monkeypatch):
    """torchvision downloads ``archive`` instead of the real one (its MD5 made the expected one); the URLs asked for."""
    from torchvision.datasets import Omniglot, utils

    asked = []

    def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        asked.append(url)
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(archive, Path(root) / (filename or Path(url).name))

    monkeypatch.setattr(utils, "download_url", download_url)
    monkeypatch.setitem(Omniglot.zips_md5, "images_background", hashlib.md5(archive.read_bytes()).hexdigest())
    return asked


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_omniglot_is_laid_out_one_class_per_character_with_its_source_and_terms(downloads, mltk_main, tmp_path):
    out = tmp_path / "data" / "omniglot"
    code, stdout, err = mltk_main("data", "fetch", "omniglot", "--out", out)
    assert code == 0, err
    assert downloads == [OMNIGLOT_URL]
    assert sorted(p.name for p in out.iterdir()) == ["Greek__character01", "Greek__character02", "Latin__character01", "fetched.json"]
    assert sorted(p.name for p in (out / "Greek__character02").iterdir()) == ["0001_01.png", "0001_02.png"]
    data = load_data(str(out))  # what --data reads: the classes, fetched.json left out
    assert data.classes == ["Greek__character01", "Greek__character02", "Latin__character01"] and len(data) == 6
    mark = json.loads((out / "fetched.json").read_text())
    assert (mark["written_by"], mark["dataset"], mark["source"], mark["images"]) == ("mltk data fetch", "omniglot", OMNIGLOT_URL, 6)
    assert mark["terms"].startswith("MIT licence")
    assert f"omniglot: 3 classes, 6 images in {out} (from {OMNIGLOT_URL})" in " ".join(stdout.split())
    assert hidden(out.parent) == []  # no temporary sibling, no download left behind


def test_a_fetch_replaces_an_earlier_fetch_but_never_a_folder_holding_anything_else(downloads, mltk_main, tmp_path):
    out = tmp_path / "omniglot"
    assert mltk_main("data", "fetch", "omniglot", "--out", out)[0] == 0
    assert mltk_main("data", "fetch", "omniglot", "--out", out)[0] == 0  # the earlier fetch, as written: replaced
    (out / "Greek__character01" / "mine.png").write_bytes(b"the user's")
    code, stdout, err = mltk_main("data", "fetch", "omniglot", "--out", out)
    assert (code, stdout) == (1, "") and err == (
        f"error: --out {str(out)!r} holds files that mltk data fetch did not write besides the dataset; "
        "mltk replaces only what it wrote: give a new or empty folder\n"
    )
    assert (out / "Greek__character01" / "mine.png").read_bytes() == b"the user's"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    code, _, err = mltk_main("data", "fetch", "omniglot", "--out", theirs)
    assert code == 1 and "holds files mltk data fetch did not write" in err
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and len(downloads) == 2  # refused before any download


def test_without_network_it_is_one_line_and_nothing_is_written(monkeypatch, mltk_main, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "new" / "omniglot"
    code, stdout, err = mltk_main("data", "fetch", "omniglot", "--out", out)
    assert (code, stdout) == (1, "")
    assert err == (
        "error: cannot download omniglot: [Errno -3] Temporary failure in name resolution (is this machine online?); "
        f"nothing was written to {str(out)!r}\n"
    )
    assert list(tmp_path.iterdir()) == []  # not even the folder above --out


def test_a_corrupt_download_is_one_line_and_nothing_is_written(downloads, monkeypatch, mltk_main, tmp_path):
    from torchvision.datasets import Omniglot

    monkeypatch.setitem(Omniglot.zips_md5, "images_background", "0" * 32)  # what arrived is not what torchvision expects
    code, _, err = mltk_main("data", "fetch", "omniglot", "--out", tmp_path / "omniglot")
    assert code == 1 and err.startswith("error: the Omniglot archive torchvision downloaded is incomplete or corrupt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "name, code, said",
    [
        ("cub200", 1, "error: mltk cannot download cub200 (Caltech-UCSD Birds-200-2011: 200 species, 11,788 images): bring your own "
                      "from https://www.vision.caltech.edu/datasets/cub_200_2011/, then give --data cub200:ROOT, ROOT as CUB_200_2011.tgz unpacks"),
        ("att", 1, "error: mltk cannot download att (AT&T (ORL) faces: 40 people, 10 images each): bring your own from "),
        ("omniglt", 2, "error: unknown dataset 'omniglt'; did you mean 'omniglot'? mltk data fetch downloads omniglot, omniglot-evaluation, "
                       "and says where to get att, cub200, cars196, sop, inshop"),
    ],
)
def test_a_dataset_no_library_downloads_says_where_to_get_it(mltk_main, tmp_path, monkeypatch, name, code, said):
    monkeypatch.chdir(tmp_path)
    got, stdout, err = mltk_main("data", "fetch", name)
    assert (got, stdout) == (code, "") and err.startswith(said) and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []
