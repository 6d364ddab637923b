"""Programmatic dependent launch (PDL, sm_90 and later): a kernel launched with it may start while the kernel
before it in the stream still runs. Its programs first read what no kernel writes (the packed weight), then
``griddepcontrol.wait`` until the previous kernel has finished and its writes are visible, and only then read the
activations and write anything. ``griddepcontrol.launch_dependents`` lets the next kernel start the same way.

At decode sizes a quantized matmul takes a few microseconds, of which the start (first loads in flight) and the
tail (the last programs alone on the GPU) are a large part; overlapping them with the neighbours' is what PDL buys.
Both instructions are no-ops for a kernel launched without the attribute.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from auto_quant.kernels import dispatch  # no cycle: dispatch imports this module only inside its launchers


@gluon.jit
def grid_wait():
    """Wait until the kernels this one depends on have completed and their memory is visible (Gluon)."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def grid_launch_dependents():
    """Let the next kernel in the stream launch once every program of this one has got here (Gluon)."""
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                              pack=1)


# Above this weight size (packed bytes) a matmul is launched plainly. H100, the tuner's two fastest `gemv`/`mma`/
# `mma_kw` tiles at 1-16 rows, back to back over weight copies (benchmarks/pdl_ab.py, docs/bench/kernels.md, 80
# pairs): weights of 8-12 MB ran 0.96-1.18x as fast with PDL (median 1.07x); 15-59 MB 0.88-1.13x (median 1.02x, 9
# of 46 pairs more than 3 % slower). The start and tail it hides are a fixed cost, worth most to short kernels.
PDL_MAX_WEIGHT_BYTES = 16 << 20
# The `mma_kb` tiles (warps splitting K, a batch each; session 14, benchmarks/config_pick.py --pdl on/off, 3 rounds
# each, 16 of the tuner's tiles at 1-16 rows): the 12 on weights above 16 MB ran 1.04-1.07x as fast with PDL at
# 29 MB and 1.00-1.02x at 59 MB, none slower (at 8-13 MB 0.94-1.17x); so up to the largest size measured
PDL_MAX_WEIGHT_BYTES_MMA_KB = 64 << 20


def pdl_max_weight_bytes(kind: str) -> int:
    """The weight size up to which a kernel kind is launched with PDL by default."""
    return PDL_MAX_WEIGHT_BYTES_MMA_KB if kind == "mma_kb" else PDL_MAX_WEIGHT_BYTES


def pdl_launch(device, weight_bytes: int, max_bytes: int = PDL_MAX_WEIGHT_BYTES) -> bool:
    """Whether a matmul over ``weight_bytes`` of packed weight on ``device`` is built with the wait and launched
    with PDL: CUDA devices of compute capability 9.0 and later (the instructions do not exist before sm_90), weights
    up to ``max_bytes`` (:data:`PDL_MAX_WEIGHT_BYTES`; the kernel kind may measure a larger bound)."""
    return (device.type == "cuda" and weight_bytes <= max_bytes
            and dispatch.capability_major(device.index) >= 9)
