"""nanokv: a small LLM inference engine where KV-cache eviction is a stage of the decode loop."""

from nanokv.budget import Budget
from nanokv.llm import LLM, GenerationOutput
from nanokv.sampling import SamplingParams

__all__ = ["LLM", "Budget", "GenerationOutput", "SamplingParams"]
__version__ = "0.1.0"
