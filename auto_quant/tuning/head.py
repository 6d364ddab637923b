"""The output head as a standalone tuning unit (same loop as the blocks).

Its inputs are whatever the model feeds the head after the last block (usually a final
norm); they are obtained generically by replaying the model with the blocks replaced by
stubs that hand over the stored last-block outputs, and reading the head's input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from auto_quant.config import TuningConfig
from auto_quant.export.base import QuantizedLayer
from auto_quant.models.discovery import BlockList, Conv1D, set_submodule, weight_as_out_in
from auto_quant.quant import QuantSpec
from auto_quant.quant.search import search_clip_coef
from auto_quant.tuning.loop import UnitData, UnitResult, tune_unit
from auto_quant.tuning.wrapper import TunableLinear


class _Handover(nn.Module):
    def __init__(self, last: bool, box: dict, as_tuple: bool):
        super().__init__()
        self.last, self.box, self.as_tuple = last, box, as_tuple

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.last:
            hidden = self.box["out"].to(hidden.device, hidden.dtype)
        return (hidden,) if self.as_tuple else hidden


@torch.no_grad()
def head_inputs(model: nn.Module, blist: BlockList, head: nn.Module, last_outputs: list[torch.Tensor],
                samples: list[dict], as_tuple: bool) -> list[torch.Tensor]:
    box: dict = {}
    seen: list[torch.Tensor] = []
    blocks = blist.blocks
    originals = list(blocks)
    handle = head.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    dev = model.get_input_embeddings().weight.device
    try:
        for i in range(len(originals)):
            blocks[i] = _Handover(i == len(originals) - 1, box, as_tuple)
        for out, sample in zip(last_outputs, samples):
            box["out"] = out
            model(input_ids=sample["input_ids"].reshape(1, -1).to(dev), use_cache=False)
    finally:
        handle.remove()
        for i, b in enumerate(originals):
            blocks[i] = b
    return seen


def tune_lm_head(model, blist, head_name: str, head: nn.Module, spec: QuantSpec, x_q, x_fp, samples, as_tuple: bool,
                 tcfg: TuningConfig, device: torch.device, progress: bool) -> tuple[QuantizedLayer, UnitResult]:
    from auto_quant.models.discovery import untie_lm_head

    untie_lm_head(model, head)
    store = x_q[0].device
    h_q = [h.to(store) for h in head_inputs(model, blist, head, x_q, samples, as_tuple)]
    h_fp = h_q if x_q is x_fp else [h.to(store) for h in head_inputs(model, blist, head, x_fp, samples, as_tuple)]
    orig_device = head.weight.device
    head.to(device)
    w_fp = weight_as_out_in(head).detach().clone()
    b_fp = None if head.bias is None else head.bias.detach().clone()
    dtype = head.weight.dtype

    def targets(idx):
        x = torch.cat([h_fp[i] for i in idx]).to(device, dtype)
        return F.linear(x, w_fp.to(dtype), None if b_fp is None else b_fp.to(dtype))

    imp = None
    if tcfg.init_search:
        acc = sum(((h.float() ** 2).reshape(-1, h.shape[-1]).sum(0)).to(device) for h in h_q)
        imp = acc / sum(h.shape[0] * h.shape[1] for h in h_q)
    coef = search_clip_coef(w_fp.float(), spec, imp) if tcfg.init_search else None
    wrapper = TunableLinear(head, spec, tune_minmax=tcfg.enable_minmax_tuning, init_coef=coef).to(device)
    data = UnitData(h_q, targets, None, device, dtype)
    set_submodule(model, head_name, wrapper)
    try:
        with torch.enable_grad():
            res = tune_unit(wrapper, {"head": wrapper}, data, tcfg, lambda u, x, c: u(x), desc="lm_head",
                            progress=progress, rtn_baseline=True)
    finally:
        set_submodule(model, head_name, head)
    qw = wrapper.bake()
    head.to(orig_device)
    bias = None if head.bias is None else head.bias.detach().cpu().clone()
    kind = "conv1d" if bool(Conv1D) and isinstance(head, Conv1D) else "linear"
    return QuantizedLayer(head_name, qw, bias, kind), res
