"""Adapters: each kind leaves a frozen GPT unchanged at initialisation, computes its formula, and learns."""
import copy
import re

import pytest
import torch
import torch.nn as nn

from adapters import (Adapted, Adapter, AdapterConfig, LoRA, adapter_parameters, adapter_report, add_adapters,
                      freeze, trainable_parameters)
from gpt import GPT, GPTConfig

KIND_CONFIGS = {
    "sequential_mlp": AdapterConfig(),  # MAGMA's released configuration
    "sequential_both": AdapterConfig(places=("mlp", "attn"), downsample=8),  # MAGMA's second one
    "parallel": AdapterConfig(kind="parallel", places=("mlp", "attn")),
    "scaled_parallel": AdapterConfig(kind="scaled_parallel", places=("mlp", "attn")),
    "lora": AdapterConfig(kind="lora", lora_targets=("attn", "mlp.c_fc"), lora_r=4),
}


def tiny_gpt(model_type="gpt2", seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(model_type=model_type, vocab_size=64, block_size=32, n_layer=2, n_head=2,
                         n_embd=32)).eval()


def ids(seed=1):
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", ["gpt2", "gptj"])
@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_zero_init_leaves_logits_unchanged(name, model_type):
    lm = tiny_gpt(model_type)
    x = ids()
    with torch.no_grad():
        before = lm(x)
        added = add_adapters(freeze(lm), KIND_CONFIGS[name])
        after = lm(x)
    assert added and all(p.requires_grad for p in adapter_parameters(lm))
    assert torch.equal(before, after)  # adding an exact zero: bit-identical


def test_added_modules_and_sizes():
    d, L = 32, 2
    lm = tiny_gpt()
    added = add_adapters(freeze(lm), AdapterConfig())
    assert len(added) == L and all(isinstance(a, Adapter) for a in added)
    assert all(isinstance(b.mlp, Adapted) and not isinstance(b.attn, Adapted) for b in lm.transformer.h)
    per_adapter = d * (d // 4) + d // 4 + (d // 4) * d + d  # down + up, with biases
    assert sum(p.numel() for p in trainable_parameters(lm)) == L * per_adapter

    lm = tiny_gpt()
    added = add_adapters(freeze(lm), AdapterConfig(places=("mlp", "attn"), downsample=8))
    assert len(added) == 2 * L and added[0].down.out_features == d // 8
    assert all(isinstance(b.attn, Adapted) for b in lm.transformer.h)

    lm = tiny_gpt()  # LoRA on the qkv and output projections of attention, and the MLP's first layer
    added = add_adapters(freeze(lm), KIND_CONFIGS["lora"])
    assert len(added) == 3 * L and all(isinstance(a, LoRA) for a in added)
    assert isinstance(lm.transformer.h[0].attn.c_attn, Adapted) and isinstance(lm.transformer.h[0].mlp.c_fc, Adapted)
    assert not isinstance(lm.transformer.h[0].mlp.c_proj, Adapted)

    lm = tiny_gpt()
    assert len(add_adapters(lm, AdapterConfig(layers=(1,)))) == 1
    assert not isinstance(lm.transformer.h[0].mlp, Adapted)


@pytest.mark.parametrize("kind", ["sequential", "parallel", "scaled_parallel"])
def test_inserted_adapter_reads_the_right_input(kind):
    lm = tiny_gpt()
    add_adapters(freeze(lm), AdapterConfig(kind=kind, places=("mlp", "attn"), init="normal", init_std=0.1))
    wrapped = lm.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        y = wrapped.module(x)
        expected = y + wrapped.adapter(y if kind == "sequential" else x)
        assert torch.allclose(wrapped(x), expected) and not torch.allclose(wrapped(x), y)


def test_adapter_formulas():
    torch.manual_seed(0)
    d = 16
    x = torch.randn(3, 5, d)
    adapter = Adapter(d, downsample=4, init="normal", init_std=0.1, layernorm=True)
    ln = adapter.ln
    assert torch.allclose(adapter(x), adapter.up(torch.relu(adapter.down(ln(x)))))
    module = nn.Linear(d, d)
    y = module(x)
    seq, par = Adapted(module, adapter, parallel=False), Adapted(module, adapter, parallel=True)
    assert torch.allclose(seq(x), y + adapter(y))
    assert torch.allclose(par(x), y + adapter(x))
    scaled = Adapter(d, init="normal", init_std=0.1, scaled=True)
    with torch.no_grad():
        scaled.scale.fill_(0.25)
    assert torch.allclose(scaled(x), 0.25 * scaled.up(torch.relu(scaled.down(x))))
    lora = LoRA(d, 8, r=2, alpha=6.0)
    with torch.no_grad():
        lora.B.normal_()
    assert torch.allclose(lora(x), 3.0 * x @ lora.A.t() @ lora.B.t(), atol=1e-6)
    # MAGMA's init: N(0, std) clamped to +-2 std, so ~4.6% of the values sit exactly on the bounds
    normal = Adapter(1024, init="normal", init_std=1e-3)
    w = normal.up.weight
    assert w.abs().max() <= 2e-3 and 0.5e-3 < w.std() < 1.5e-3
    on_bounds = (w.abs() == torch.tensor(2e-3)).float().mean().item()
    assert 0.03 < on_bounds < 0.06, on_bounds
    assert AdapterConfig(places="attn", lora_targets="mlp.c_fc").places == ("attn",)  # one name, not letters
    assert AdapterConfig(places="attn", lora_targets="mlp.c_fc").lora_targets == ("mlp.c_fc",)
    zero = Adapter(d)
    assert zero.up.weight.abs().sum() == 0 and zero.up.bias.abs().sum() == 0 and zero.down.weight.abs().sum() > 0


def train_steps(lm, steps=5, lr=0.5):
    """A few plain gradient steps on every parameter that gets a gradient, pushing the logits toward a
    fixed target (plain SGD by hand: torch.optim's first use costs seconds of imports)."""
    x = ids(2)
    target = torch.randint(0, 64, x.shape, generator=torch.Generator().manual_seed(3))
    for _ in range(steps):
        lm.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(lm(x).flatten(0, 1), target.flatten()).backward()
        with torch.no_grad():
            for p in lm.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)


@pytest.mark.parametrize("name", list(KIND_CONFIGS))
def test_each_kind_learns_and_base_stays_frozen(name):
    lm = tiny_gpt()
    base = copy.deepcopy(lm.state_dict())
    x = ids()
    with torch.no_grad():
        before = lm(x)
    added = add_adapters(freeze(lm), KIND_CONFIGS[name])
    start = [p.detach().clone() for p in adapter_parameters(lm)]
    train_steps(lm)
    assert all(not torch.equal(a, p) for a, p in zip(start, adapter_parameters(lm))), "an adapter did not train"
    if name == "scaled_parallel":
        assert all(a.scale.item() != 1.0 for a in added)  # the learnable scalar moved from its init
    if name == "lora":
        assert all(a.B.abs().sum() > 0 for a in added)
    # the base weights (now under `.module.` in the wrapped names) are bit-identical
    wrapped = {k.replace(".module.", "."): v for k, v in lm.state_dict().items() if ".adapter." not in k}
    assert set(wrapped) == set(base)
    assert all(torch.equal(wrapped[k], base[k]) for k in base)
    with torch.no_grad():
        assert not torch.allclose(lm(x), before)


def test_freeze_trainable_and_report():
    lm = tiny_gpt()
    assert len(trainable_parameters(lm)) == len(list(lm.parameters()))
    freeze(lm)
    assert trainable_parameters(lm) == []
    add_adapters(lm, AdapterConfig())
    assert {id(p) for p in trainable_parameters(lm)} == {id(p) for p in adapter_parameters(lm)}
    report = adapter_report(lm)
    n_adapter = sum(p.numel() for p in adapter_parameters(lm))
    n_lm = sum(p.numel() for p in lm.parameters()) - n_adapter
    assert re.fullmatch(r"adapters: \S+ trainable = \d+\.\d% of the LM \(\S+ frozen\); trainable in all: \S+",
                        report), report
    assert f"{100 * n_adapter / n_lm:.1f}% of the LM" in report


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="kind"):
        AdapterConfig(kind="houlsby2")
    with pytest.raises(ValueError, match="places"):
        AdapterConfig(places=("ffn",))
    with pytest.raises(ValueError, match="activation"):
        AdapterConfig(activation="swishy")
    with pytest.raises(ValueError, match=r"downsample \(4.0\).*integers >= 1"):
        AdapterConfig(downsample=4.0)
    with pytest.raises(ValueError, match=r"layers: \(0, 0\) names a block twice"):
        AdapterConfig(layers=[0, 0])
    lm = tiny_gpt()
    add_adapters(lm, AdapterConfig())
    with pytest.raises(ValueError, match="twice"):
        add_adapters(lm, AdapterConfig())
    with pytest.raises(ValueError, match="lora_targets.*c_attn"):
        add_adapters(tiny_gpt(), AdapterConfig(kind="lora", lora_targets=("attn.q_proj",)))
    with pytest.raises(ValueError, match="out of range"):
        add_adapters(tiny_gpt(), AdapterConfig(layers=(5,)))
    with pytest.raises(ValueError, match="downsample 1000 leaves no bottleneck"):
        add_adapters(tiny_gpt(), AdapterConfig(downsample=1000))


def test_fp32_adapters_in_a_bf16_model():
    lm = tiny_gpt().to(torch.bfloat16)
    x = ids()
    with torch.no_grad():
        before = lm(x)
    added = add_adapters(freeze(lm), AdapterConfig(places=("mlp", "attn"), layers=(0,)))
    added += add_adapters(lm, AdapterConfig(kind="lora", layers=(1,), lora_targets=("mlp.c_proj",)))
    assert all(p.dtype == torch.float32 for a in added for p in a.parameters())
    with torch.no_grad():
        assert torch.equal(lm(x), before)
    lm(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(lm))


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_adapter_output_joins_in_the_modules_dtype(kind):
    """CUDA autocast runs LayerNorm in fp32, so an fp32 x can reach a projection that returns bf16. The
    sum must stay bf16: an fp32 LoRA delta on c_attn would otherwise turn q, k, v (and the attention
    kernel) into fp32. (CPU autocast keeps LayerNorm in bf16; a cast stands in for the projection.)"""
    class ToBf16(nn.Module):
        def forward(self, x):
            return x.to(torch.bfloat16)

    adapter = LoRA(16, 16) if kind == "lora" else Adapter(16, downsample=4, init="normal", init_std=0.1)
    module = Adapted(ToBf16(), adapter, parallel=kind == "lora")
    x = torch.randn(2, 3, 16)  # fp32, as a LayerNorm's output under CUDA autocast
    y = module(x)
    assert y.dtype == torch.bfloat16
    expected = x.to(torch.bfloat16) + adapter(x if kind == "lora" else x.to(torch.bfloat16)).to(torch.bfloat16)
    assert torch.equal(y, expected)


@pytest.mark.parametrize("layernorm", [False, True])
def test_under_autocast_fp32_adapters_skip_the_cast_and_give_the_same_result(layernorm):
    """Under bf16 autocast an fp32 adapter reads bf16 x as it is: no fp32 copy of x, the same output
    and gradients as casting first (autocast brings a matmul's input back to bf16 anyway)."""
    torch.manual_seed(0)
    adapter = Adapter(32, downsample=4, layernorm=layernorm, init="normal", init_std=0.1, scaled=True)
    lora = LoRA(32, 48)
    nn.init.normal_(lora.B)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16, requires_grad=True)
    for module in (adapter, lora):
        results = []
        for cast_first in (True, False):
            module.zero_grad()
            x.grad = None
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = module(x.float() if cast_first else x)
            y.float().square().sum().backward()
            results.append([y.to(x.dtype), x.grad] + [p.grad for p in module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results))
    # and no fp32 copy of x is made on the way in
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_copies_of_x = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32 and out.shape == x.shape:
                self.fp32_copies_of_x += 1
            return out

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Copies() as mode:
        adapter(x)
    assert mode.fp32_copies_of_x == (1 if layernorm else 0)
