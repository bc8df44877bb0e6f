"""Multi-turn, token-in token-out rollouts through the delayed or coupled protocol."""

from .engine import ChatFormat, RolloutConfig, RolloutEngine, Trajectory, TurnRecord, batch_stats
from .generator import GenerationOutput, Generator, SamplingParams
from .scripted import ScriptedGenerator

__all__ = ["ChatFormat", "GenerationOutput", "Generator", "RolloutConfig", "RolloutEngine",
           "SamplingParams", "ScriptedGenerator", "Trajectory", "TurnRecord", "batch_stats"]
