"""auto_quant.eval."""
