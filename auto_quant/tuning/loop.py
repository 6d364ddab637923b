"""Stage 2: the one sign-gradient tuning loop, for decoder blocks and standalone layers alike."""

from __future__ import annotations

import contextlib

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from auto_quant.config import TuningConfig
from auto_quant.tuning.capture import BlockCall, collate_calls
from auto_quant.tuning.graphed import build_static_step
from auto_quant.tuning.wrapper import TunableLinear, clamp_all, sign_step

ForwardFn = Callable[[nn.Module, torch.Tensor, BlockCall | None], torch.Tensor]


@dataclass
class UnitResult:
    loss_before: float  # eval-subset loss of plain RTN
    loss_init: float  # eval-subset loss at the start of tuning (after the clipping search)
    loss_after: float  # eval-subset loss of the kept iterate
    best_iter: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    step: str = "eager"  # how training steps ran: "eager", "static" (fixed buffers) or "cuda_graph"


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def block_forward(unit: nn.Module, hidden: torch.Tensor, call: BlockCall | None) -> torch.Tensor:
    if call is None:
        return _output(unit(hidden))
    return _output(unit(hidden, *call.args, **call.kwargs))


class UnitData:
    """Inputs, targets and per-sample call arguments of one unit, with batching."""

    def __init__(self, inputs, targets, calls, device, dtype, masks=None, batched: bool = True):
        self.inputs = inputs  # list of [1, seq, dim]
        self.targets = targets
        self.calls = calls  # list of BlockCall or None
        self.device = device
        self.dtype = dtype
        self.masks = masks  # list of [seq] (1 = real token) or None: padded positions carry no loss
        self.batched = batched  # False: the unit's batched forward failed, every sample runs alone

    def __len__(self):
        return len(self.inputs)

    def batches(self, idx: list[int]):
        """Yield (hidden, call, target, weight) sub-batches that can run as one forward."""
        calls = None if self.calls is None else [self.calls[i] for i in idx]
        merged = None if (calls is None or not self.batched) else collate_calls(calls)
        groups = [idx] if (calls is None or merged is not None) else [[i] for i in idx]
        for g in groups:
            hidden = torch.cat([self.inputs[i] for i in g]).to(self.device, self.dtype)
            if callable(self.targets):  # computed per batch (e.g. vocab-sized logits of the output head)
                target = self.targets(g)
            else:
                target = torch.cat([self.targets[i] for i in g]).to(self.device)
            if self.calls is None:
                call = None
            elif len(g) == len(idx) and merged is not None:
                call = merged
            else:
                call = self.calls[g[0]]
            mask = None
            if self.masks is not None and any(self.masks[i] is not None for i in g):
                mask = torch.stack([self.masks[i] if self.masks[i] is not None else torch.ones(hidden.shape[1])
                                    for i in g]).to(self.device, torch.float32)
            yield hidden, _to(call, self.device, self.dtype), target, len(g) / len(idx), mask


def _to(call, device, dtype):
    if call is None:
        return None
    from auto_quant.tuning.capture import move_call

    return move_call(call, device, dtype)


def unit_loss(unit, data: UnitData, idx: list[int], forward: ForwardFn) -> torch.Tensor:
    total = 0.0
    for hidden, call, target, weight, mask in data.batches(idx):
        out = forward(unit, hidden, call)
        if mask is None:
            loss = F.mse_loss(out.float(), target.float())
        else:  # mean over real tokens only
            err = ((out.float() - target.float()) ** 2).mean(-1)
            loss = (err * mask).sum() / mask.sum().clamp(min=1)
        total = total + weight * loss
    return total


@torch.no_grad()
def eval_loss(unit, data: UnitData, idx: list[int], forward: ForwardFn, batch_size: int) -> float:
    total = 0.0
    for s in range(0, len(idx), batch_size):
        chunk = idx[s : s + batch_size]
        total += float(unit_loss(unit, data, chunk, forward)) * len(chunk)
    return total / max(1, len(idx))


@contextlib.contextmanager
def only_tunables_require_grad(unit: nn.Module, wrappers: dict[str, TunableLinear]):
    """Within the block, backward computes gradients for the tuned parameters only (not norms, biases)."""
    tuned = {id(p) for w in wrappers.values() for p in w.tunables()}
    frozen = [p for p in unit.parameters() if p.requires_grad and id(p) not in tuned]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def tune_unit(
    unit: nn.Module,
    wrappers: dict[str, TunableLinear],
    data: UnitData,
    cfg: TuningConfig,
    forward: ForwardFn = block_forward,
    desc: str = "",
    progress: bool = True,
    rtn_baseline: bool = False,
) -> UnitResult:
    """Sign-SGD on the rounding offsets and clipping coefficients of ``wrappers`` inside ``unit``.

    Keeps the iterate with the lowest loss on a fixed evaluation subset (the start point
    included, so the result is never worse than where tuning began on that subset).
    """
    with only_tunables_require_grad(unit, wrappers):
        return _tune_unit(unit, wrappers, data, cfg, forward, desc, progress, rtn_baseline)


def _tune_unit(unit, wrappers, data, cfg, forward, desc, progress, rtn_baseline) -> UnitResult:
    import time

    t0 = time.perf_counter()
    n = len(data)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_idx = torch.randperm(n, generator=gen)[: min(n, cfg.eval_samples)].tolist()
    eval_bs = max(1, cfg.batch_size)

    def evaluate() -> float:  # the weights do not change within an evaluation: quantize them once
        with contextlib.ExitStack() as stack:
            for w in wrappers.values():
                stack.enter_context(w.frozen())
            return eval_loss(unit, data, eval_idx, forward, eval_bs)

    loss_before = float("nan")
    if rtn_baseline:  # loss of plain RTN (no offset, full range), for the report
        saved = {k: w.snapshot() for k, w in wrappers.items()}
        for w in wrappers.values():
            w.reset_to_rtn()
        loss_before = evaluate()
        for k, w in wrappers.items():
            w.restore(saved[k])
    loss_init = evaluate()
    if math.isnan(loss_before):
        loss_before = loss_init
    best = (loss_init, 0, {k: w.snapshot() for k, w in wrappers.items()})
    curve = [(0, loss_init)]

    iters = cfg.iters
    step = "eager"
    if iters > 0:
        v_params = [w.v for w in wrappers.values()]
        mm_params = [p for w in wrappers.values() for p in (w.min_coef, w.max_coef) if p.requires_grad]
        lr = cfg.lr if cfg.lr is not None else 1.0 / iters
        mm_lr = cfg.minmax_lr if cfg.minmax_lr is not None else lr
        eval_every = max(1, iters // max(1, cfg.eval_points))
        order = torch.randperm(n, generator=gen).tolist()
        cursor = 0

        def next_batch() -> list[int]:
            nonlocal order, cursor
            if cursor + cfg.batch_size > n:
                order = torch.randperm(n, generator=gen).tolist()
                cursor = 0
            idx = order[cursor : cursor + min(cfg.batch_size, n)]
            cursor += len(idx)
            return idx

        static = build_static_step(unit, list(wrappers.values()), data, forward, cfg, v_params, mm_params)
        bar = tqdm(total=iters, desc=desc, leave=False, disable=not progress)
        for it in range(iters):
            decay = 1.0 - it / iters  # linear decay to 0
            if static is not None:  # the same step, replayed from fixed buffers
                static.run(next_batch(), lr * decay, mm_lr * decay)
            else:
                for _ in range(cfg.gradient_accumulate_steps):
                    loss = unit_loss(unit, data, next_batch(), forward) / cfg.gradient_accumulate_steps
                    loss.backward()
                with torch.no_grad():
                    sign_step(v_params, lr * decay)
                    sign_step(mm_params, mm_lr * decay)
                    clamp_all(wrappers.values())
            if (it + 1) % eval_every == 0 or it + 1 == iters:
                cur = evaluate()
                curve.append((it + 1, cur))
                if cur < best[0]:
                    best = (cur, it + 1, {k: w.snapshot() for k, w in wrappers.items()})
                bar.set_postfix_str(f"loss {loss_init:.3g} -> {best[0]:.3g}")
            bar.update(1)
        bar.close()
        if static is not None:
            step = "cuda_graph" if static.graph is not None else "static"
            static.close()
        for k, w in wrappers.items():
            w.restore(best[2][k])
    return UnitResult(
        loss_before=loss_before,
        loss_init=loss_init,
        loss_after=best[0],
        best_iter=best[1],
        curve=curve,
        seconds=time.perf_counter() - t0,
        step=step,
    )
