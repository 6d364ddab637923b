"""auto_quant.kernels: Triton kernels for packed low-bit weights (W2/W3/W4/W8, A16).

``pack`` builds the kernel layout (pure torch); ``dispatch`` picks and launches a variant;
``triton_qmm`` holds the kernels. Triton is imported only when a kernel runs.
"""

from auto_quant.kernels.pack import KERNEL_BITS, KernelWeight, dequantize, from_quant_linear, pack_codes

__all__ = ["KERNEL_BITS", "KernelWeight", "dequantize", "from_quant_linear", "pack_codes"]
