"""The process's random streams (Python, numpy, torch): seeding, and their state in a checkpoint,
so that a resumed run draws what the uninterrupted one would."""

from __future__ import annotations

import random

import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seeds Python's, torch's and numpy's global generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def rng_state() -> dict:
    """The three generators' states as JSON-able data."""
    import numpy as np

    st = random.getstate()
    np_st = np.random.get_state()
    return {"python": [st[0], list(st[1]), st[2]], "torch": torch.get_rng_state().tolist(),
            "numpy": [np_st[0], np_st[1].tolist(), int(np_st[2]), int(np_st[3]), float(np_st[4])]}


def set_rng_state(state: dict) -> None:
    """Restores what :func:`rng_state` returned."""
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))

