"""Stages in order: calibration capture → per-block tuning → (optional) lm_head tuning.

Memory placement is decided here and only here: the model stays where it was loaded (CPU);
each block moves to the tuning device for its turn; cached hidden states live on the
tuning device unless ``low_gpu_mem_usage`` keeps them on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from auto_quant.config import QuantConfig
from auto_quant.export.base import QuantizedLayer
from auto_quant.export.fused import harmonise as harmonise_fused
from auto_quant.models.discovery import (
    BlockList,
    Conv1D,
    find_block_list,
    find_lm_head,
    quantizable_layers,
    set_submodule,
    untie_lm_head,
    weight_as_out_in,
)
from auto_quant.models.moe import router_layers, split_fused_experts
from auto_quant.quant import QuantSpec
from auto_quant.quant.search import rtn_weight, search_clip_coef
from auto_quant.tuning.capture import BlockCall, capture_block_inputs
from auto_quant.tuning.loop import UnitData, UnitResult, block_forward, tune_unit
from auto_quant.tuning.placement import PlacementPlan, hook_on, spread_block, unhook
from auto_quant.tuning.wrapper import TunableLinear, grouped_quantizer

log = logging.getLogger(__name__)


@dataclass
class QuantizationOutcome:
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    units: dict[str, UnitResult] = field(default_factory=dict)  # per block (and lm_head)
    specs: dict[str, QuantSpec | None] = field(default_factory=dict)
    block_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0


def plan_layers(model: nn.Module, cfg: QuantConfig) -> tuple[BlockList, dict[str, QuantSpec | None], str | None]:
    """Which layers get which spec; validates layer_config against real layer names.

    Fused MoE experts are split into per-expert linears first (:mod:`auto_quant.models.moe`), in place:
    every expert is then a layer like any other; MoE routers stay in 16 bits unless layer_config names them.
    """
    split_fused_experts(model)
    routers = router_layers(model)
    blist = find_block_list(model)
    specs: dict[str, QuantSpec | None] = {}
    names = []
    for i, blk in enumerate(blist.blocks):
        for name in quantizable_layers(blk, f"{blist.name}.{i}"):
            names.append(name)
    head = find_lm_head(model)
    head_name = head[0] if head else None
    every = names + ([head_name] if head_name else [])
    cfg.check_rules_match(every)
    explicit = {n for n in every if any(r.matches(n) for r in cfg.layer_rules)}
    for name in names:
        specs[name] = None if name in routers and name not in explicit else cfg.spec_for(name)
    if head_name is not None:
        specs[head_name] = cfg.spec_for(head_name, is_lm_head=True)
    specs = harmonise_fused(specs, getattr(cfg, "fused_layers", "harmonise"), explicit)
    return blist, specs, head_name


def _bias_of(layer: nn.Module):
    return None if layer.bias is None else layer.bias.detach().cpu().clone()


def _kind(layer: nn.Module) -> str:
    return "conv1d" if bool(Conv1D) and isinstance(layer, Conv1D) else "linear"


@torch.no_grad()
def rtn_layer(name: str, layer: nn.Module, spec: QuantSpec, importance: torch.Tensor | None = None,
              search: bool = False) -> QuantizedLayer:
    """Quantize one layer in place without tuning (plain RTN, or RTN after the clipping search)."""
    w = weight_as_out_in(layer).detach().to(torch.float32)
    qw = rtn_weight(w, spec, importance, search)
    deq = qw.dequantize(torch.float32)
    layer.weight.data.copy_((deq.t() if _kind(layer) == "conv1d" else deq).to(layer.weight.dtype))
    return QuantizedLayer(name, QuantizedWeight_cpu(qw), _bias_of(layer), _kind(layer))


def QuantizedWeight_cpu(qw):
    from auto_quant.quant import QuantizedWeight

    if hasattr(qw, "cpu"):  # a K-quant weight (auto_quant.quant.kquant.KQuantWeight)
        return qw.cpu()
    return QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.spec)


def quantize_rtn(model: nn.Module, cfg: QuantConfig) -> QuantizationOutcome:
    t0 = time.perf_counter()
    blist, specs, head_name = plan_layers(model, cfg)
    out = QuantizationOutcome(specs=specs, block_names=[blist.name])
    modules = dict(model.named_modules())
    for name, spec in specs.items():
        if spec is not None:
            if name == head_name:
                untie_lm_head(model, modules[name])
            out.layers[name] = rtn_layer(name, modules[name], spec)
    out.seconds = time.perf_counter() - t0
    return out


class _ImportanceHooks:
    """Mean squared input activation per input channel of each linear in a block."""

    def __init__(self, layers: dict[str, nn.Module]):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def _hook(self, name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            s = (x * x).sum(0)
            self.sums[name] = self.sums.get(name, 0) + s
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]

        return fn

    def remove(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {n: self.sums[n] / max(1, self.counts[n]) for n in self.sums}


@torch.no_grad()
def _run_block(block, inputs, calls, device, dtype, batch_size, store: torch.device,
               in_place: bool = False, batched: bool = True) -> tuple[list[torch.Tensor], bool]:
    """Block outputs for every sample (batched when their arguments allow), kept on ``store``; and whether the
    samples ran batched.

    When a batched forward raises (an argument shared by the samples does not broadcast over a batch, as
    Bloom's ``[batch * heads, 1, seq]`` ALiBi bias), the samples are replayed one by one and ``False`` is
    returned, for the callers to keep doing so. ``in_place`` overwrites ``inputs`` batch by batch, so the
    inputs and the outputs of the whole calibration set are never held at the same time (no retry then).
    """
    data = UnitData(inputs, inputs, calls, device, dtype, batched=batched)
    try:
        return _replay(block, data, store, batch_size, in_place), batched
    except RuntimeError as e:
        if in_place or not batched or calls is None:
            raise
        log.info("batched replay failed (%s); replaying this block's samples one by one",
                 str(e).splitlines()[0][:160] if str(e) else type(e).__name__)
        data.batched = False
        return _replay(block, data, store, batch_size, in_place), False


def _replay(block, data: UnitData, store: torch.device, batch_size: int, in_place: bool) -> list[torch.Tensor]:
    inputs = data.inputs
    outs = inputs if in_place else [None] * len(inputs)
    n = len(inputs)
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        parts = []
        for hidden, call, _, _, _ in data.batches(idx):
            parts.append(block_forward(block, hidden, call))
        y = torch.cat(parts)
        for j, i in enumerate(idx):
            outs[i] = y[j : j + 1].to(store)
    return outs


def quantizer_factory(compile: bool):
    """One (possibly compiled) fake-quantizer per spec, shared by every layer of a run."""
    made: dict[QuantSpec, object] = {}

    def get(spec: QuantSpec):
        if spec not in made:
            made[spec] = grouped_quantizer(spec, compile) if spec.fmt == "int" else None
        return made[spec]

    return get


def quantize_tuned(model: nn.Module, cfg: QuantConfig, samples: list[dict], device: torch.device,
                   progress: bool = True, placement: PlacementPlan | None = None) -> QuantizationOutcome:
    """Block-by-block sign-SGD tuning; the model is fake-quantized in place.

    ``placement`` (from :mod:`auto_quant.tuning.placement`) may put some of a block's linears on other
    devices than ``device`` and decide where the calibration cache lives; None keeps everything on ``device``.
    """
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blist, specs, head_name = plan_layers(model, cfg)
    out = QuantizationOutcome(specs=specs, block_names=[blist.name])
    tcfg = cfg.tuning
    torch.manual_seed(tcfg.seed)
    was_training = model.training
    model.eval()
    store = torch.device("cpu") if cfg.low_gpu_mem_usage else device
    if placement is not None:
        store = placement.cache_device()
    dtype = next(blist.blocks[0].parameters()).dtype

    quantizer = quantizer_factory(tcfg.compile)
    captured = capture_block_inputs(model, blist, samples)
    masks = [s.get("attention_mask") for s in samples]
    masks = None if all(m is None for m in masks) else [None if m is None else m.reshape(-1).float() for m in masks]
    # memory: at most two calibration-sized sets of hidden states live at once — the quantized
    # chain's inputs (x_q) and the float chain's outputs (targets, next block's x_fp)
    x_fp = [h.to(store) for h in captured.hidden]
    captured.hidden = []
    x_q = x_fp
    chains_equal = True  # no block quantized yet: the quantized chain is the float chain
    n_blocks = len(blist.blocks)
    for i in range(n_blocks):
        block = blist.blocks[i]
        bname = f"{blist.name}.{i}"
        calls: list[BlockCall] = captured.calls[i]
        orig_device = next(block.parameters()).device
        block.to(device)
        layers = quantizable_layers(block, bname)
        hooked = spread_block(layers, placement, device)
        todo = {n: m for n, m in layers.items() if specs.get(n) is not None}
        hooks = _ImportanceHooks(todo) if tcfg.init_search else None
        targets, batched = _run_block(block, x_fp, calls, device, dtype, tcfg.batch_size, store)
        importance = hooks.remove() if hooks else {}
        x_fp = None  # the float chain continues from targets
        if todo:
            wrappers: dict[str, TunableLinear] = {}
            for name, layer in todo.items():
                spec = specs[name]
                home = torch.device(placement.device_for(name)) if hooked else device
                coef = (search_clip_coef(weight_as_out_in(layer).detach().float(), spec, importance.get(name))
                        if tcfg.init_search else None)
                w = TunableLinear(layer, spec, tune_minmax=tcfg.enable_minmax_tuning, init_coef=coef,
                                  quantizer=quantizer(spec)).to(home)
                if home != device:
                    hook_on(w, home)
                wrappers[name] = w
                set_submodule(model, name, w)
            data = UnitData(x_q, targets, calls, device, dtype, masks, batched=batched)
            try:
                with torch.enable_grad():
                    res = tune_unit(block, wrappers, data, tcfg, block_forward, desc=f"block {i + 1}/{n_blocks}",
                                    progress=progress, rtn_baseline=True)
            finally:
                for name, w in wrappers.items():
                    set_submodule(model, name, w.layer)
                # hooked, a wrapper is in a reference cycle: its float32 tunables stayed on their GPU until Python's
                # cycle collector ran (+0.43 GiB a block on the second GPU over Llama-3-8B's 32 blocks,
                # docs/multigpu.md)
                unhook([w for w in wrappers.values() if hasattr(w, "_hf_hook")])
            for name, w in wrappers.items():
                qw = w.bake()
                out.layers[name] = QuantizedLayer(name, qw, _bias_of(w.layer), _kind(w.layer))
            out.units[bname] = res
            log.info("%s: loss RTN %.4g, start %.4g -> tuned %.4g (best at iter %d, %.1fs)", bname, res.loss_before,
                     res.loss_init, res.loss_after, res.best_iter, res.seconds)
            del data
        if todo or not chains_equal:
            x_q, _ = _run_block(block, x_q, calls, device, dtype, tcfg.batch_size, store, in_place=True,
                                batched=batched)
        else:  # nothing quantized yet: both chains are the float chain
            x_q = targets
        chains_equal = chains_equal and not todo
        x_fp = targets
        unhook(hooked)
        block.to(orig_device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if head_name is not None and specs.get(head_name) is not None:
        modules = dict(model.named_modules())
        head = modules[head_name]
        from auto_quant.tuning.head import tune_lm_head

        layer, res = tune_lm_head(model, blist, head_name, head, specs[head_name], x_q, x_fp, samples,
                                  captured.output_is_tuple, tcfg, device, progress)
        out.layers[head_name] = layer
        out.units[head_name] = res
    model.train(was_training)
    out.seconds = time.perf_counter() - t0
    if device.type == "cuda":
        out.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    return out
