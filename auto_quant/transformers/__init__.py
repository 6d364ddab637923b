"""auto_quant.transformers (in progress)."""
