"""GPT with Megatron tensor parallelism; see gpt.py for the model and params.py for the parallel
plan."""

from megatron.model.config import ModelConfig
from megatron.model.gpt import GPTModel, GPTOutput

__all__ = ["ModelConfig", "GPTModel", "GPTOutput"]
