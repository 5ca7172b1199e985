"""Every random draw of a run derives from (--seed, purpose, step, ...), never from the rank
or the order of work, so resuming, re-sharding or reordering changes nothing drawn."""

import numpy as np

# Purposes: the second part of every derived seed.
DATA_ORDER, SELECTION, SAMPLING, REPLAY_SAMPLING, REPLAY_SELECTION, REPLAY_CUTS = 1, 2, 3, 4, 5, 6


def derived_seed(*parts) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def derived_rng(*parts):
    return np.random.default_rng(derived_seed(*parts))
