"""Built-in datasets: ``digits``, bundled with scikit-learn, so a first run needs no download; and the standard
benchmarks, read from their own folders (``cub200:/data/CUB_200_2011``; docs/benchmarks.md).

A builder's parameters say what a spec may give it (``mltk.data.dataset_options``): ``root``, ``split``, ``crop``.
"""

import mltk


def digits():
    from mltk.data import digits

    return digits()


def cub200(root: str, split: str = "train", crop: bool = False):
    from mltk.datasets import cub200

    return cub200(root, split, crop)


def cars196(root: str, split: str = "train", crop: bool = False):
    from mltk.datasets import cars196

    return cars196(root, split, crop)


def sop(root: str, split: str = "train"):
    from mltk.datasets import sop

    return sop(root, split)


def inshop(root: str, split: str = "train"):
    from mltk.datasets import inshop

    return inshop(root, split)


@mltk.hookimpl
def register_datasets(register):
    register("digits", digits, description="scikit-learn's 8x8 handwritten digits, 10 classes, 1,797 images")
    register("cub200", cub200, description="CUB-200-2011 from its folder (cub200:ROOT[:test][:crop]): classes 1-100 train, 101-200 test")
    register("cars196", cars196, description="Stanford Cars from its folder (cars196:ROOT[:test][:crop]): classes 1-98 train, 99-196 test")
    register("sop", sop, description="Stanford Online Products from its folder (sop:ROOT[:test]): Ebay_train.txt, Ebay_test.txt")
    register("inshop", inshop, description="DeepFashion In-Shop from its folder (inshop:ROOT[:test|query|gallery]): test is query vs gallery")
