"""The registry of algorithms: `--algo NAME` -> its module's `Algorithm` (base.py).

Adding an algorithm is one module that builds an `Algorithm`, one line here, and its tests.
A name that is not here fails `TrainConfig.validate` in one line, and a lookup of it is a
KeyError: it can never run another algorithm.
"""

from . import grpo, s_grpo, t_spmo, top_entropy

ALGORITHMS = {algorithm.name: algorithm for algorithm in (
    grpo.ALGORITHM,
    s_grpo.ALGORITHM,
    t_spmo.ALGORITHM,
    top_entropy.ALGORITHM,
)}


def options() -> list:
    """Every algorithm's options, in registry order, each with its algorithm."""
    return [(algorithm, option) for algorithm in ALGORITHMS.values()
            for option in algorithm.options]
