"""Multi-turn, token-in token-out rollouts through the delayed or coupled protocol."""

from .engine import ChatFormat, RolloutConfig, RolloutEngine, Trajectory, TurnRecord, batch_stats
from .generator import GenerateProgress, GenerationOutput, Generator, SamplingParams, derive_seed
from .scripted import ScriptedGenerator


def __getattr__(name):  # HFGenerator pulls in transformers: import it only when asked for
    if name == "HFGenerator":
        from .hf import HFGenerator

        return HFGenerator
    raise AttributeError(name)

__all__ = ["ChatFormat", "GenerateProgress", "GenerationOutput", "Generator", "HFGenerator", "RolloutConfig",
           "RolloutEngine", "SamplingParams", "ScriptedGenerator", "Trajectory", "TurnRecord", "batch_stats",
           "derive_seed"]
