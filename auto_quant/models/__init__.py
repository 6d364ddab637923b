"""Finding decoder blocks and quantizable layers in any transformers causal LM."""

from auto_quant.models.discovery import (
    BlockList,
    find_block_list,
    find_lm_head,
    is_quantizable,
    quantizable_layers,
    weight_as_out_in,
)

__all__ = ["BlockList", "find_block_list", "find_lm_head", "is_quantizable", "quantizable_layers", "weight_as_out_in"]
