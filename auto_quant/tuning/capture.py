"""Stage 1: capture what every decoder block receives in a real forward pass.

Each block of the list is swapped for a recorder that stores its arguments and passes the
hidden states through unchanged, so only the embeddings (and whatever the model computes
before the blocks: masks, rotary tables) run. Every block keeps the arguments *it* was
called with — models that alternate sliding-window and full attention give different
blocks different masks and rotary tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from auto_quant.models.discovery import BlockList, body_of


@dataclass
class BlockCall:
    """The non-hidden-state arguments of one block for one sample."""

    args: tuple
    kwargs: dict


@dataclass
class CapturedInputs:
    hidden: list[torch.Tensor]  # block-0 hidden states, one [1, seq, dim] tensor per sample
    calls: list[list[BlockCall]]  # calls[block][sample]
    output_is_tuple: bool
    _dedupe_cache: dict = field(default_factory=dict, repr=False)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _dedupe(value, previous):
    """Reuse ``previous`` when equal, so identical per-sample tensors are one object."""
    if previous is not None and _same(value, previous):
        return previous
    return value


# a block's KV-cache argument under its names across transformers versions (5.24 passes ``cache`` and deprecates
# ``past_key_values``), and flags that only matter with a cache or for outputs the tuning does not read
_DROP_KWARGS = ("past_key_value", "past_key_values", "cache", "use_cache", "output_attentions", "layer_past")


def _clean(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if k in _DROP_KWARGS:
            continue
        out[k] = v
    return out


class _Recorder(nn.Module):
    def __init__(self, index: int, block: nn.Module, sink: "_Sink"):
        super().__init__()
        self.index = index
        self.block = block
        self.sink = sink

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
            rest = ()
        self.sink.record(self.index, self.block, hidden, rest, kwargs)
        return (hidden,) if self.sink.output_is_tuple else hidden


class _Sink:
    def __init__(self, n_blocks: int):
        self.hidden: list[torch.Tensor] = []
        self.calls: list[list[BlockCall]] = [[] for _ in range(n_blocks)]
        self.output_is_tuple: bool | None = None

    def record(self, index, block, hidden, rest, kwargs):
        kwargs = _clean(kwargs)
        if index == 0:
            self.hidden.append(hidden.detach())
            if self.output_is_tuple is None:  # learn the block's return structure once
                with torch.no_grad():
                    probe = block(hidden, *rest, **kwargs)
                self.output_is_tuple = isinstance(probe, (tuple, list))
        prev = self.calls[index][-1] if self.calls[index] else None
        args = tuple(_dedupe(a, prev.args[i] if prev and i < len(prev.args) else None) for i, a in enumerate(rest))
        kw = {k: _dedupe(v, prev.kwargs.get(k) if prev else None) for k, v in kwargs.items()}
        # blocks after the first usually share the same tensors: reuse the previous block's
        if index > 0 and self.calls[index - 1]:
            other = self.calls[index - 1][-1]
            kw = {k: _dedupe(v, other.kwargs.get(k)) for k, v in kw.items()}
        self.calls[index].append(BlockCall(args=args, kwargs=kw))


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block_list: BlockList, samples: list[dict]) -> CapturedInputs:
    """Run the model body on each sample (batch of one) with the blocks replaced by recorders."""
    blocks = block_list.blocks
    sink = _Sink(len(blocks))
    originals = list(blocks)
    body = body_of(model)
    try:
        for i, blk in enumerate(originals):
            blocks[i] = _Recorder(i, blk, sink)
        for sample in samples:
            inputs = {"input_ids": sample["input_ids"].reshape(1, -1).to(_device_of(model))}
            if sample.get("attention_mask") is not None:
                inputs["attention_mask"] = sample["attention_mask"].reshape(1, -1).to(inputs["input_ids"].device)
            body(**inputs, use_cache=False)
    finally:
        for i, blk in enumerate(originals):
            blocks[i] = blk
    return CapturedInputs(hidden=sink.hidden, calls=sink.calls, output_is_tuple=bool(sink.output_is_tuple))


def _device_of(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.weight.device
    return next(model.parameters()).device


def collate(values: list[Any]):
    """Merge one argument over a batch of samples: shared objects stay shared, tensors concatenate on dim 0.

    A shared tensor is passed once and must broadcast over the batch (Qwen2-VL's ``[3, 1, seq]`` positions
    do); one that folds the batch into a dimension (Bloom's ALiBi bias, ``[batch * heads, 1, seq]``) makes
    the batched forward fail, and the pipeline then replays that block's samples one by one.
    """
    first = values[0]
    if all(v is first for v in values):
        return first
    if all(isinstance(v, torch.Tensor) for v in values):
        if all(v.shape == first.shape for v in values) and first.dim() > 0 and first.shape[0] == 1:
            return torch.cat(values, dim=0)
        raise _NotCollatable
    if all(isinstance(v, (tuple, list)) for v in values) and len({len(v) for v in values}) == 1:
        return type(first)(collate([v[i] for v in values]) for i in range(len(first)))
    if all(not isinstance(v, torch.Tensor) for v in values) and all(v == first for v in values):
        return first
    raise _NotCollatable


class _NotCollatable(Exception):
    """Internal signal: the batch's arguments differ in structure; run samples one by one."""


def collate_calls(calls: list[BlockCall]) -> BlockCall | None:
    """One call for a batch of samples, or None when they cannot be batched together."""
    try:
        n_args = {len(c.args) for c in calls}
        keys = {tuple(sorted(c.kwargs)) for c in calls}
        if len(n_args) != 1 or len(keys) != 1:
            return None
        args = tuple(collate([c.args[i] for c in calls]) for i in range(len(calls[0].args)))
        kwargs = {k: collate([c.kwargs[k] for c in calls]) for k in calls[0].kwargs}
        return BlockCall(args=args, kwargs=kwargs)
    except _NotCollatable:
        return None


def move_call(call: BlockCall, device: torch.device, dtype: torch.dtype | None = None) -> BlockCall:
    def mv(x):
        if isinstance(x, torch.Tensor):
            if dtype is not None and x.is_floating_point():
                return x.to(device=device, dtype=dtype)
            return x.to(device)
        if isinstance(x, (tuple, list)):
            return type(x)(mv(y) for y in x)
        return x

    return BlockCall(args=tuple(mv(a) for a in call.args), kwargs={k: mv(v) for k, v in call.kwargs.items()})
