"""auto_quant.inference."""
