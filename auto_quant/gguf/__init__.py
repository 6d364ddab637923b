"""auto_quant.gguf (in progress)."""
