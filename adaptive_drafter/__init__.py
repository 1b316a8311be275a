"""adaptive-drafter: lossless speculative rollouts for RL training of LLMs, with a drafter that keeps up."""

from .config import SpecConfig
from .engine import SpecOutput, SpeculativeEngine
from .metrics import SpecStats
from .sampling import SamplingParams

__all__ = ["SpecConfig", "SpecOutput", "SpecStats", "SamplingParams", "SpeculativeEngine"]
__version__ = "0.1.0"
