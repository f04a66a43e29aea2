"""Built-in miners: every pytorch-metric-learning miner by its class name, short aliases for the common ones."""

import functools
import inspect

import mltk

ALIASES = {
    "hard": "BatchHardMiner",
    "easyhard": "BatchEasyHardMiner",
    "multisimilarity": "MultiSimilarityMiner",
    "triplet": "TripletMarginMiner",
    "pair": "PairMarginMiner",
    "distance": "DistanceWeightedMiner",
}
NOT_MINERS = {"BaseMiner", "BaseTupleMiner", "BaseSubsetBatchMiner", "EmbeddingsAlreadyPackagedAsTriplets"}


def pml_miner(class_name: str, **kwargs):
    from pytorch_metric_learning import miners

    from mltk.errors import UsageError

    try:
        return getattr(miners, class_name)(**kwargs)
    except TypeError as exc:  # an option the miner does not take, or one it needs
        raise UsageError(f"miner {class_name!r}: {exc}; set its options under miner_options in the config file") from None


@mltk.hookimpl
def register_miners(register):
    from pytorch_metric_learning import miners

    from mltk.default_plugins.losses import declared

    for alias, name in ALIASES.items():
        register(alias, declared(functools.partial(pml_miner, name), getattr(miners, name), ()), description=f"alias of {name}")
    for name, cls in sorted(vars(miners).items()):
        if inspect.isclass(cls) and issubclass(cls, miners.BaseMiner) and name not in NOT_MINERS:
            register(name, declared(functools.partial(pml_miner, name), cls, ()), description="pytorch-metric-learning")
