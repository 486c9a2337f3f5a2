"""Quantized weight storage applied to a built model (fp8, GGUF): weights stay compressed, compute dequantizes."""
