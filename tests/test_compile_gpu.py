"""The ``triton`` backend under ``torch.compile`` (``pytest -m gpu``; skipped without CUDA): a quantized layer traces
as the ``auto_quant::triton_matmul`` op with the tuner's pick for its row bucket, whole decoders compile without a
break at the layers, and compiled (and CUDA-graphed) decode matches eager."""

from __future__ import annotations

import contextlib

import pytest
import torch

from test_kernels_gpu import quantized_llama, rel_err, two_gpu_checkpoint

pytestmark = pytest.mark.gpu


def attached_llama(layers=2, seed=0):
    from auto_quant.inference.backends import attach_backends

    model = quantized_llama(layers, group_size=128, sym=True, seed=seed)
    assert set(attach_backends(model, tuning_cache=None).values()) == {"triton"}
    return model


def tuner_of(model):
    from auto_quant.inference.qlinear import QuantLinear

    return next(m.kernel.run.tuner for m in model.modules() if isinstance(m, QuantLinear))


class GraphCounter:
    """A ``torch.compile`` backend that runs the traced graph as it is and keeps what it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def op_calls(self, index=-1):
        op = torch.ops.auto_quant.triton_matmul
        return [n for n in self.graphs[index].graph.nodes if n.target in (op, op.default)]


def static_decode(model, fwd, prompt, steps=6, around_step=lambda i: contextlib.nullcontext()):
    """The logits of ``steps`` greedy decode steps through ``fwd`` over a ``StaticCache``, after an eager prefill
    of ``prompt``; each step runs inside ``around_step(i)``."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=32)
    logits, n = [], prompt.shape[1]
    with torch.no_grad():
        pos = torch.arange(n, device=prompt.device)
        out = model(input_ids=prompt, past_key_values=cache, cache_position=pos, use_cache=True).logits
        ids = out[:, -1:].argmax(-1)
        for i in range(n, n + steps):
            pos = torch.tensor([i], device=prompt.device)
            with around_step(i):
                out = fwd(input_ids=ids, past_key_values=cache, cache_position=pos, position_ids=pos[None],
                          use_cache=True).logits
            logits.append(out.clone())
            ids = out[:, -1:].argmax(-1)
    return torch.cat(logits)


def test_mlp_traces_to_the_op_with_the_tuners_pick_in_one_graph():
    from auto_quant.kernels.dispatch import m_bucket
    from auto_quant.inference.triton_backend import config_from_ints

    torch._dynamo.reset()
    model = attached_llama()
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref = mlp(x)
        tuner = tuner_of(model)
        tuner.best.clear()  # the pick must come from the trace
        counter = GraphCounter()
        out = torch.compile(mlp, backend=counter, fullgraph=True)(x)
    assert len(counter.graphs) == 1
    calls = counter.op_calls()
    assert len(calls) == 3  # gate, up, down: no graph break around them
    picked = {key[5:7]: cfg for key, cfg in tuner.best.items() if key[4] == m_bucket(3)}
    assert set(picked) == {(768, 256), (256, 768)}
    for n in calls:
        out_features = n.args[10]
        in_features = 768 if out_features == 256 else 256
        assert config_from_ints(n.args[11]) == picked[out_features, in_features]
    assert rel_err(out, ref) < 1e-3


def test_a_symbolic_row_count_compiles_once_per_bucket():
    torch._dynamo.reset()
    model = attached_llama()
    mlp = model.model.layers[0].mlp
    counter = GraphCounter()
    fn = torch.compile(mlp, backend=counter, dynamic=True)
    with torch.no_grad():
        for rows in (5, 6, 7, 8):  # one bucket (8 rows)
            x = torch.randn(rows, 256, device="cuda", dtype=torch.float16)
            assert rel_err(fn(x), mlp(x)) < 1e-3
        assert len(counter.graphs) == 1
        x = torch.randn(11, 256, device="cuda", dtype=torch.float16)  # the next bucket: a graph of its own
        assert rel_err(fn(x), mlp(x)) < 1e-3
    assert len(counter.graphs) == 2


def test_compiled_model_prefill_matches_eager():
    torch._dynamo.reset()
    model = attached_llama()
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model)(ids).logits
    assert rel_err(out, ref) < 1e-2


def test_reduce_overhead_decode_with_a_static_cache_matches_eager():
    """Inductor's CUDA graphs over whole decode steps: the ops' PDL launches and split-K buffers inside them."""
    torch._dynamo.reset()
    model = attached_llama()
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    prompt = torch.randint(0, 512, (1, 6), device="cuda")
    ref = static_decode(model, model.forward, prompt)
    out = static_decode(model, forward, prompt)
    assert rel_err(out, ref) < 1e-2


def test_default_mode_decode_replays_the_layers_bound_launches():
    """Without CUDA graphs Inductor calls the op at every step. From the second step on the op replays the
    layer's bound launch (found on the view of the packed weight that the traced call passes, not on the module's
    buffer) instead of its full path, and the decode matches eager."""
    from unittest import mock

    from auto_quant.inference.qlinear import QuantLinear

    torch._dynamo.reset()
    model = attached_llama()
    layers = [m.kernel.run for m in model.modules() if isinstance(m, QuantLinear)]
    forward = torch.compile(model.forward, dynamic=False)
    prompt = torch.randint(0, 512, (1, 6), device="cuda")

    def no_full_path_from_the_fourth_step(i):
        if i < prompt.shape[1] + 3:
            return contextlib.nullcontext()
        return mock.patch("auto_quant.inference.triton_backend.quant_matmul", side_effect=AssertionError("full path"))

    ref = static_decode(model, model.forward, prompt)
    out = static_decode(model, forward, prompt, around_step=no_full_path_from_the_fourth_step)
    assert rel_err(out, ref) < 1e-2
    assert all(any(len(key) == 7 for key in layer.bound) for layer in layers)  # the op's keys (with the variant)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert not hasattr(m.qweight, "auto_quant_bound")  # the module's state stays plain tensors


def test_a_deep_copy_compiles_on_its_own_layers_after_the_original_is_gone():
    """A deep-copied model's trace-time picks reach its own layers: with the original deleted (its layers freed),
    the copy still compiles, and its compiled decode matches its eager decode."""
    import copy
    import gc

    from auto_quant.inference.qlinear import QuantLinear

    torch._dynamo.reset()
    model = attached_llama()
    copied = copy.deepcopy(model)
    del model
    gc.collect()
    assert all(m.kernel.run._module is m for m in copied.modules() if isinstance(m, QuantLinear))
    prompt = torch.randint(0, 512, (1, 6), device="cuda")
    ref = static_decode(copied, copied.forward, prompt)
    out = static_decode(copied, torch.compile(copied.forward, dynamic=False), prompt)
    assert rel_err(out, ref) < 1e-2


def test_generate_with_a_static_cache_compiles_a_loaded_checkpoint(tmp_path):
    """transformers compiles ``generate``'s forward for a static cache on a GPU only if the quantizer allows it:
    a checkpoint loaded through ``from_pretrained`` takes that path and generates what eager decoding does."""
    from tiny_models import tiny_model, token_data
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRound, AutoRoundConfig

    torch._dynamo.reset()
    model = tiny_model("llama", intermediate_size=256, num_hidden_layers=2)
    out = tmp_path / "tiny_w4"
    AutoRound(model, None, bits=4, group_size=32, sym=True, iters=0, dataset=token_data(2, 32), nsamples=2,
              seqlen=32, progress=False).quantize_and_save(str(out))
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map={"": 0},
                                             quantization_config=AutoRoundConfig(tuning_cache=None))
    assert m.hf_quantizer.is_compileable
    ids = torch.randint(0, 200, (1, 8), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        eager = m.generate(ids, **kw)
        assert getattr(m, "_compiled_call", None) is None
        static = m.generate(ids, cache_implementation="static", **kw)
    assert getattr(m, "_compiled_call", None) is not None  # generate compiled the forward
    same = (static.sequences == eager.sequences).all(0).tolist()[ids.shape[1]:]
    steps = same.index(False) + 1 if False in same else len(same)  # up to a near-tie's first different token
    assert steps >= 2
    assert rel_err(torch.stack(static.logits[:steps]), torch.stack(eager.logits[:steps])) < 1e-2


def test_a_graph_traced_under_cuda_graph_capture_replays_correctly():
    """Tracing may happen inside a user's ``torch.cuda.graph`` capture: the pick then runs nothing (the tuner gives
    its heuristic) and the captured op replays the right product."""
    torch._dynamo.reset()
    model = attached_llama()
    mlp = model.model.layers[0].mlp
    tuner_of(model).best.clear()
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    fn = torch.compile(mlp, backend=GraphCounter(), fullgraph=True)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.cuda.graph(graph):
            out = fn(x)
        torch.cuda.current_stream().wait_stream(side)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, mlp(x)) < 1e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_model_split_over_two_gpus_compiles_and_decodes_as_in_eager(tmp_path, mode):
    """A checkpoint loaded over cuda:0 and cuda:1 under ``torch.compile``: the compiled prefill and static-cache
    decode give eager's logits, and the layers on cuda:1 launch there. accelerate's device hooks are excluded from
    tracing (``torch.compiler.disable``), so the graph breaks at every hooked block, and once the hook's shared
    wrapper reaches dynamo's recompile limit the blocks run eagerly (session 28, docs/kernels.md)."""
    from transformers import AutoModelForCausalLM

    from auto_quant import AutoRoundConfig
    from auto_quant.inference.qlinear import QuantLinear

    torch._dynamo.reset()
    out, split = two_gpu_checkpoint(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map=split,
                                             quantization_config=AutoRoundConfig(backend="triton", tuning_cache=None))
    second = [q.kernel.run for q in m.modules() if isinstance(q, QuantLinear) and q.qweight.device.index == 1]
    assert second
    prompt = torch.randint(0, 200, (1, 6), device="cuda:0")
    with torch.no_grad():
        ref = m(prompt).logits
        got = torch.compile(m.forward, mode=mode, dynamic=False)(prompt).logits
    assert rel_err(got, ref) < 1e-2
    torch._dynamo.reset()
    forward = torch.compile(m.forward, mode=mode, dynamic=False)
    assert rel_err(static_decode(m, forward, prompt), static_decode(m, m.forward, prompt)) < 1e-2
    assert all(layer.bound and all(b.device_index == 1 for b in layer.bound.values()) for layer in second)
