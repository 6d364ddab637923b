"""auto_quant.export.gguf (in progress)."""
