"""The engine: the step loop, the model runner and output processing."""
from loraplex.engine.engine import LLMEngine

__all__ = ["LLMEngine"]
