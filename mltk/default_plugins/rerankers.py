"""Built-in re-rankers of retrieval lists (mltk.rerank): none, k-reciprocal, qe and dba, by the names ``--rerank`` takes."""

import mltk
from mltk.errors import UsageError


def _options(name: str, params: dict, accepted: dict[str, str]) -> dict:
    """``params`` under their constructor names (``accepted``: spec key -> argument), or a UsageError naming the keys it takes."""
    for key in params:
        if key not in accepted:
            takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
            raise UsageError(f"{name} {takes}; got {key!r}")
    return {accepted[key]: value for key, value in params.items()}


def none(**params):
    from mltk.rerank import NoRerank

    _options("none", params, {})
    return NoRerank()


def k_reciprocal(**params):
    from mltk.rerank import KReciprocal

    return KReciprocal(**_options("k-reciprocal", params, {"k1": "k1", "k2": "k2", "lambda": "lam", "candidates": "candidates"}))


def qe(**params):
    from mltk.rerank import QueryExpansion

    return QueryExpansion(**_options("qe", params, {"n": "n", "alpha": "alpha"}))


def dba(**params):
    from mltk.rerank import QueryExpansion

    return QueryExpansion(**_options("dba", params, {"n": "n", "alpha": "alpha"}), dba=True)


@mltk.hookimpl
def register_rerankers(register):
    register("none", none, description="the lists as the search found them (the default)")
    register("k-reciprocal", k_reciprocal, description="Zhong et al. 2017: k1, k2, lambda, candidates")
    register("qe", qe, description="α-query expansion: n, alpha")
    register("dba", dba, description="database-side augmentation, then α-QE: n, alpha")
