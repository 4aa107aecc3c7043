"""Keyed random streams: counter-based generators keyed by (seed, purpose, round, chunk), so a
draw never depends on which worker or thread runs a task.

A leaf module like :mod:`kmdask.errors`: staging (augmentation draws) and the engine (seeding
draws) both use it, and neither may import the other.
"""

from __future__ import annotations

import numpy as np


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A generator determined only by ``seed`` and the integer ``keys``.

    Uses Philox (a counter-based bit generator) seeded through ``SeedSequence`` with the
    keys as spawn entropy, so streams for different keys are independent.
    """
    ss = np.random.SeedSequence(entropy=int(seed) & (2**63 - 1),
                                spawn_key=tuple(int(k) for k in keys))
    return np.random.Generator(np.random.Philox(ss))
