"""auto_quant.tuning."""
