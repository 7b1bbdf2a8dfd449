"""loraplex: one base LLM, many LoRA experts, served in the same batches."""
from loraplex.llm import LLM
from loraplex.lora.request import LoRARequest
from loraplex.outputs import CompletionOutput, RequestOutput
from loraplex.sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
