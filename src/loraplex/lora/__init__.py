"""LoRA adapters: requests, PEFT loading and validation, device slots."""
from loraplex.lora.request import LoRARequest

__all__ = ["LoRARequest"]
