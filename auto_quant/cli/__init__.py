"""auto_quant.cli."""
