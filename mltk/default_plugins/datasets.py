"""Built-in datasets: ``digits``, bundled with scikit-learn, so a first run needs no download."""

import mltk


def digits():
    from mltk.data import digits

    return digits()


@mltk.hookimpl
def register_datasets(register):
    register("digits", digits, description="scikit-learn's 8x8 handwritten digits, 10 classes, 1,797 images")
