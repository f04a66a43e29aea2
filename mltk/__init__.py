"""mltk: a metric-learning toolkit for PyTorch.

``mltk.hookimpl`` is what a plugin imports; ``mltk.load(run_dir)`` gives a trained embedder.
This module stays light: torch and friends are imported where they are used.
"""

from mltk.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "load", "__version__"]


def load(run, device=None):
    """The trained embedder of a run directory or checkpoint; ``.embed(images_or_paths)`` gives vectors."""
    from mltk.model import load as _load

    return _load(run, device)
