"""Model families (as data), weight loading (safetensors, GGUF) and model-id resolution."""
