"""adaptive-drafter: lossless speculative rollouts for RL training of LLMs, with a drafter that keeps up."""

from .config import SpecConfig
from .engine import SpeculativeEngine
from .metrics import SpecStats
from .outputs import PolicyTargets, SpecOutput
from .sampling import SamplingParams

__all__ = ["PolicyTargets", "SpecConfig", "SpecOutput", "SpecStats", "SamplingParams", "SpeculativeEngine"]
__version__ = "0.1.0"
