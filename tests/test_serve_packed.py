"""`packed_weights` (the default): a CPU replica keeps its base's linear weights also packed for oneDNN's
kernels, and every adapter's view of the base multiplies with those packs. Answers are those of the
plain weights."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from adapter_factory import llama_with_adapters
from onebase.serve.artifacts import inspect
from onebase.serve.engine import BaseEngine, Row

PROMPTS = ["Hello there", "The weather today is"]
METHODS = {"lora": {"name": "lora", "r": 4}, "dora": {"name": "dora", "r": 4},
           "houlsby": {"name": "houlsby", "bottleneck": 8}, "prompt": {"name": "prompt", "num_virtual_tokens": 4}}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return llama_with_adapters(tmp_path_factory.mktemp("packed"), METHODS, seed=500)


def packed_products(engine: BaseEngine, rows: list[Row]) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.generate(rows)
    return sum(e.count for e in prof.key_averages() if e.key == "mkldnn::_linear_pointwise")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_packed_weights_answer_as_the_plain_weights_for_every_view(made, dtype):
    base, exports = made
    plain = BaseEngine(str(base), dtype=dtype, packed_weights=False)
    packed = BaseEngine(str(base), dtype=dtype)
    assert plain.packed is None and packed.packed is not None
    answers = {}
    for engine in (plain, packed):
        loaded = [None] + [engine.load(name, inspect(path)) for name, path in exports.items()]
        rows = [Row(adapter, prompt, max_tokens=8, logprobs=0) for adapter in loaded for prompt in PROMPTS]
        answers[engine is packed] = engine.generate(rows)
        if engine is packed:  # each view (the bare base, the LoRA pool, DoRA's, Houlsby's, the prompt's) uses the packs
            assert all(packed_products(engine, [Row(adapter, PROMPTS[0], max_tokens=2)]) for adapter in loaded)
        else:
            assert not packed_products(engine, rows[:1])
    assert [a["text"] for a in answers[True]] == [a["text"] for a in answers[False]]
    # fp32: summation order; bf16: bit for bit on this project's CPU, bf16 rounding of the logits elsewhere.
    tolerance = 1e-4 if dtype == "float32" else 2e-2
    for with_packs, without in zip(answers[True], answers[False]):
        for a, b in zip(with_packs["logprobs"], without["logprobs"]):
            assert a["token"] == b["token"] and abs(a["logprob"] - b["logprob"]) <= tolerance


def test_a_training_forward_keeps_the_plain_product(made):
    """Packed products have no gradient: a forward that needs one (a view trained by someone, a test's
    reference) takes the plain weights."""
    base, _ = made
    engine = BaseEngine(str(base))
    layer = engine.base.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.allclose(x.grad, layer.weight.sum(0).expand_as(x), atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(layer(x.detach()), torch.nn.functional.linear(x.detach(), layer.weight), atol=1e-5)
