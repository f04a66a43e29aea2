"""``mltk data fetch``: a dataset downloaded by a well-kept library, laid out as ``--data`` reads a folder.

mltk keeps no download code of its own: torchvision downloads and checks Omniglot, and mltk moves
its files into ``<class>/<image>``, one class per character (``Greek__character01/0394_01.png``).
The other datasets mltk's examples and benchmarks use are the user's to bring: ``SOURCES`` says
where each comes from, under which terms, and how ``--data`` reads it.

The folder follows mltk's rule for what it writes (``mltk.outputs.check_replaceable``): it is built
in a hidden sibling and renamed into place, and replaces only an earlier fetch that holds nothing else.
"""

import difflib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.error import URLError

from mltk.errors import MltkError, UsageError
from mltk.outputs import check_dir, check_replaceable, replace_folder, writing

#: at the folder's root (files there are not classes): what ``mltk data fetch`` wrote, from where, under which terms
MARK = "fetched.json"


@dataclass(frozen=True)
class Source:
    title: str
    page: str  # where the dataset comes from
    terms: str  # its licence or terms, as the source states them
    read_as: str  # how --data reads it
    fetch: Callable[[Path], str] | None = None  # lays it out in an empty folder and returns the URL it came from; None: bring your own


def omniglot(background: bool) -> Callable[[Path], str]:
    def fetch(folder: Path) -> str:
        from torchvision.datasets import Omniglot

        download = folder / ".download"
        try:
            dataset = Omniglot(str(download), background=background, download=True)
        except RuntimeError as exc:  # torchvision's MD5 check of the archive
            raise MltkError(f"the Omniglot archive torchvision downloaded is incomplete or corrupt ({exc}); run mltk data fetch again") from None
        images = Path(dataset.target_folder)  # torchvision's layout: <Alphabet>/<characterNN>/<id>_<drawer>.png
        for alphabet in sorted(p for p in images.iterdir() if p.is_dir()):
            for character in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                os.replace(character, folder / f"{alphabet.name}__{character.name}")
        shutil.rmtree(download)
        return f"{Omniglot.download_url_prefix}/{images.name}.zip"

    return fetch


OMNIGLOT_TERMS = "MIT licence (Copyright (c) 2015 Brenden Lake); cite Lake, Salakhutdinov and Tenenbaum, Science 350(6266), 2015"
SOURCES = {
    "omniglot": Source(
        "Omniglot, background set: 30 alphabets, 964 characters, 20 drawings each", "https://github.com/brendenlake/omniglot",
        OMNIGLOT_TERMS, "a folder of <Alphabet>__<characterNN>/<image>.png", omniglot(background=True),
    ),
    "omniglot-evaluation": Source(
        "Omniglot, evaluation set: 20 other alphabets, 659 characters, 20 drawings each", "https://github.com/brendenlake/omniglot",
        OMNIGLOT_TERMS, "a folder of <Alphabet>__<characterNN>/<image>.png", omniglot(background=False),
    ),
    "att": Source(
        "AT&T (ORL) faces: 40 people, 10 images each", "https://www.cl.cam.ac.uk/research/dtg/attarchive/facedatabase.html (no longer online; "
        "copies of att_faces circulate)", "its README asks to give credit to Olivetti Research Laboratory; it states no other terms",
        "--data FOLDER, the folder of s1 ... s40 as it unpacks",
    ),
    "cub200": Source(
        "Caltech-UCSD Birds-200-2011: 200 species, 11,788 images", "https://www.vision.caltech.edu/datasets/cub_200_2011/",
        "its README states no licence (the images come from Flickr); cite Wah et al., CNS-TR-2011-001, 2011", "--data cub200:ROOT, ROOT as CUB_200_2011.tgz unpacks",
    ),
    "cars196": Source(
        "Stanford Cars: 196 models, 16,185 images", "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (torchvision can no longer download it)",
        "see the dataset's page; cite Krause et al., 3dRR-13, 2013", "--data cars196:ROOT, ROOT as the devkit and images unpack",
    ),
    "sop": Source(
        "Stanford Online Products: 22,634 products, 120,053 images", "https://cvgl.stanford.edu/projects/lifted_struct/",
        "see the dataset's page; cite Oh Song et al., CVPR 2016", "--data sop:ROOT, ROOT as Stanford_Online_Products.zip unpacks",
    ),
    "inshop": Source(
        "DeepFashion In-Shop Clothes Retrieval: 7,982 items, 52,712 images", "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
        "the dataset's page gives its terms of use; cite Liu et al., CVPR 2016", "--data inshop:ROOT, ROOT with Eval/ and Img/ as they unpack",
    ),
}


@dataclass
class Fetched:
    name: str
    folder: Path
    url: str
    classes: int
    images: int
    terms: str


def source(name: str) -> Source:
    """The dataset ``name``, or one line naming close names and every name there is."""
    if name in SOURCES:
        return SOURCES[name]
    close = difflib.get_close_matches(name, list(SOURCES), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    fetched = ", ".join(n for n, s in SOURCES.items() if s.fetch)
    brought = ", ".join(n for n, s in SOURCES.items() if not s.fetch)
    raise UsageError(f"unknown dataset {name!r}; {hint}mltk data fetch downloads {fetched}, and says where to get {brought}")


def check_out(name: str, out: str | Path | None) -> Path:
    """``--out`` (default: ./NAME) before any download: new, empty, or an earlier fetch that holds nothing else."""
    out = check_dir(Path(out if out is not None else name))
    check_replaceable(out, mine=earlier_fetch_or_nothing, advice="give a new or empty folder")
    return out


def earlier_fetch_or_nothing(out: Path) -> str | None:
    """None when ``out`` may be written: absent, empty, or the folder an earlier fetch wrote, as it wrote it."""
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        mark = json.loads((out / MARK).read_text())
        written = set(mark["classes"]) | {MARK}
        images = mark["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return "holds files mltk data fetch did not write"
    if {p.name for p in out.iterdir()} != written or sum(len(files) for _, _, files in os.walk(out)) != images + 1:
        return "holds files that mltk data fetch did not write besides the dataset"
    return None


def fetch(name: str, out: str | Path | None = None) -> Fetched:
    """Download dataset ``name`` and lay it out in ``out`` (default ./NAME) as ``<class>/<image>``, with ``fetched.json``."""
    found = source(name)
    if found.fetch is None:
        raise MltkError(f"mltk cannot download {name} ({found.title}): bring your own from {found.page}, then give {found.read_as}")
    out = check_out(name, out)
    kept = f"nothing was written to {str(out)!r}"
    with replace_folder(out, f"{name} to {str(out)!r}", kept, recheck=lambda: check_out(name, out)) as tmp, writing(f"{name} to {str(out)!r}", kept):
        try:
            url = found.fetch(tmp)
        except (URLError, ConnectionError, TimeoutError) as exc:  # no network, a name that does not resolve, an HTTP error
            raise MltkError(f"cannot download {name}: {getattr(exc, 'reason', exc)} (is this machine online?); {kept}") from None
        classes = sorted(p.name for p in tmp.iterdir() if p.is_dir())
        images = sum(len(files) for _, _, files in os.walk(tmp))
        mark = {
            "written_by": "mltk data fetch", "dataset": name, "title": found.title, "source": url, "page": found.page,
            "terms": found.terms, "classes": classes, "images": images, "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARK).write_text(json.dumps(mark, indent=1) + "\n")
    return Fetched(name, out, url, len(classes), images, found.terms)
