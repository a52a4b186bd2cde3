"""MAGMA: frozen LM, text-only loss, interleaved embedding, cached generation, sampling, checkpoints, CLI."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from adapters import AdapterConfig, adapter_parameters
from attention import INTERPRET, TRITON_IMPORT_ERROR
from data import clip_preprocess
from gpt import GPT, DecodeStep, GPTConfig, sample_next
from magma import ImagePrefix, Magma, MagmaConfig, cross_entropy, evaluating, main, read_magma_checkpoint
from tokenizer import ByteTokenizer, Tokenizer, train_bpe
from vit import OPENAI_NAMES, ViT, ViTConfig, rename

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM = dict(model_type="gpt2", vocab_size=257, block_size=96, n_layer=2, n_head=2, n_embd=32)
VIT = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2, embed_dim=16)  # 1 + 4 image tokens


def tiny_magma(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(lm=GPTConfig(**LM), vit=ViTConfig(**VIT))
    config.update(overrides)
    return Magma(MagmaConfig(**config))


def sharpen(model, std=0.3):
    """Re-draw the LM's weights larger, so that its greedy choices depend on the whole context (at GPT-2's
    init scale a tiny LM mostly echoes its last token, and context bugs would go unseen)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if ".adapter." not in name and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def pixels(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def captions(tok, texts):
    """Right-padded caption ids + eos and their mask, as data.collate makes them (pad id 0)."""
    rows = [tok.encode(t) + [tok.eos_id] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])
    return ids, mask


def sgd_steps(model, steps=3, lr=0.1):
    """Plain gradient steps on every parameter that gets a gradient (no torch.optim: its import is slow)."""
    ids, mask = captions(model.tokenizer, ["a red circle", "two"])
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(pixels(2), ids, mask).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-lr)


def test_zero_init_adapters_keep_the_lm_logits():
    torch.manual_seed(0)
    bare = GPT(GPTConfig(**LM)).eval()
    reference = copy.deepcopy(bare)
    model = Magma(MagmaConfig(adapters=AdapterConfig(places=("mlp", "attn"))), lm=bare, tokenizer=ByteTokenizer())
    idx = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        assert torch.equal(model.lm(idx), reference(idx))
    assert model.lm is bare and model.config.lm == bare.config  # wraps the given LM, config describes it
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.report().startswith("adapters: ") and f"trainable in all: {n_trained / 1e3:.1f}K" in model.report()


def test_image_prefix_is_linear_dropout_layernorm():
    prefix = ImagePrefix(32, 24)  # MAGMA's: every ViT token, Linear -> Dropout(0.1) -> LayerNorm
    assert prefix.dropout.p == 0.1 and isinstance(prefix.ln, nn.LayerNorm)
    assert tiny_magma().prefix.dropout.p == 0.1 and tiny_magma().prefix.ln is not None  # Magma's defaults
    h = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(prefix.eval()(h), prefix.ln(prefix.proj(h)), atol=1e-6)
        prefix.train()
        torch.manual_seed(0)
        out = prefix(h)
        torch.manual_seed(0)  # the same dropout mask, applied before the LayerNorm
        assert torch.allclose(out, prefix.ln(F.dropout(prefix.proj(h), 0.1, training=True)), atol=1e-6)
        assert not torch.allclose(out, prefix.eval()(h))
        assert ImagePrefix(32, 24, tokens="patches")(h).shape == (2, 4, 24)  # the class token dropped


def test_training_changes_only_adapters_prefix_and_vit():
    # LM dropout set high: the LM must stay in eval mode however the model is switched
    model = tiny_magma(lm=GPTConfig(**LM, dropout=0.5), prefix_dropout=0.0)
    lm_params = {id(p) for p in adapter_parameters(model.lm)}
    base = {n: p.detach().clone() for n, p in model.lm.named_parameters() if id(p) not in lm_params}
    assert base and not any(p.requires_grad for n, p in model.lm.named_parameters() if n in base)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    assert not model.lm.training and model.vit.training and model.prefix.training
    ids, mask = captions(model.tokenizer, ["a red circle", "two"])
    assert model(pixels(2), ids, mask).item() == model(pixels(2), ids, mask).item()  # no dropout anywhere
    # Hand every parameter to AdamW with weight decay, as MAGMA's code did: a frozen weight must not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(pixels(2), ids, mask).backward()
        opt.step()
    for n, p in model.lm.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen LM weight {n} changed"
    unused = ("vit.ln_post.", "vit.proj")  # CLIP's pooling head: MAGMA reads the hidden states before it
    changed = {n: not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained}
    assert all(c for n, c in changed.items() if not n.startswith(unused)), [n for n, c in changed.items() if not c]
    assert any(n.startswith("lm.") for n in changed) and any(n.startswith("prefix.") for n in changed)
    assert any(n.startswith("vit.blocks.") for n in changed)

    frozen_vit = tiny_magma(freeze_vit=True)
    before = copy.deepcopy(frozen_vit.vit.state_dict())
    frozen_vit.train()
    assert not frozen_vit.vit.training and not any(p.requires_grad for p in frozen_vit.vit.parameters())
    sgd_steps(frozen_vit)
    assert all(torch.equal(v, before[k]) for k, v in frozen_vit.vit.state_dict().items())


def test_loss_is_text_only_and_matches_hand_computation():
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1)).eval()
    ids, mask = captions(model.tokenizer, ["hello", "hi"])  # row 1: 3 real tokens (h, i, eos), 3 pads
    px = pixels(2)
    loss = model(px, ids, mask)
    with torch.no_grad():
        image = model.image_embeds(px)  # (2, 5, 32)
        x = torch.cat([image, model.lm.transformer.wte(ids)], 1)
        logp = F.log_softmax(model.lm(inputs_embeds=x).double(), -1)  # (2, 5 + 6, V), every position
    I, terms = image.shape[1], []
    for b in range(2):
        for j in range(ids.shape[1]):
            if mask[b, j]:  # text token j is predicted at position I - 1 + j (the last image position first)
                terms.append(-logp[b, I - 1 + j, ids[b, j]])
    assert len(terms) == 6 + 3  # both eos tokens are targets
    assert abs(loss.item() - torch.stack(terms).mean().item()) < 1e-5
    # padding ids are irrelevant; the image conditions the text
    other = ids.clone()
    other[1, 3:] = torch.tensor([7, 200, 256])
    assert model(px, other, mask).item() == loss.item()
    assert abs(model(pixels(2, seed=1), ids, mask).item() - loss.item()) > 1e-4
    with pytest.raises(ValueError, match="text_mask"):
        model(px, ids, mask[:, :3])
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, 16, 16\), got \(3, 16, 16\)"):
        model(px[0], ids, mask)  # one image without its batch dimension: named as such
    # no real token at all: nothing to predict, loss 0 and a zero gradient (not 0/0)
    empty = model(px, ids, torch.zeros_like(mask))
    empty.backward()
    assert empty.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_embed_interleaved_images_and_text_left_padded():
    model = tiny_magma().eval()
    img1, img2 = pixels(2)
    example = [img1, "ab", img2, "cde"]
    with torch.no_grad():
        e = model.embed(example)
        i1, i2 = model.image_embeds(torch.stack([img1, img2]))
        text = model.lm.transformer.wte(torch.tensor(model.tokenizer.encode("ab") + model.tokenizer.encode("cde")))
        assert e.shape == (5 + 2 + 5 + 3, 32)
        assert torch.allclose(e, torch.cat([i1, text[:2], i2, text[2:]]), atol=1e-6)
        x, mask = model.embed_batch([example, ["xy", img1]])
        assert x.shape == (2, 15, 32) and mask[0].all() and mask[1].tolist() == [False] * 8 + [True] * 7
        assert torch.allclose(x[1, 8:], model.embed(["xy", img1]), atol=1e-6) and (x[1, :8] == 0).all()
    assert tiny_magma(prefix_tokens="patches").eval().embed([img1]).shape == (4, 32)
    with pytest.raises(ValueError, match=r"\(3, 16, 16\)"):
        model.embed([torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="float and CLIP-normalised.*uint8"):
        model.embed([torch.zeros(3, 16, 16, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="list"):
        model.generate(["just a string"])


def test_cached_logits_equal_uncached_on_interleaved_inputs():
    model = sharpen(tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))).eval()
    img1, img2 = pixels(2)
    with torch.no_grad():
        x, mask = model.embed_batch([[img1, "ab", img2, "cde"], ["xy", img1], ["q"]])  # (3, 15, C)
        full = model.lm(inputs_embeds=x, key_padding_mask=mask)  # (3, 15, V)
        cache = model.lm.new_cache(3, 15)
        chunks = []
        for start, end in [(0, 9), (9, 12)] + [(t, t + 1) for t in range(12, 15)]:
            chunks.append(model.lm(inputs_embeds=x[:, start:end], key_padding_mask=mask[:, :end], cache=cache))
        cached = torch.cat(chunks, 1)
    assert torch.allclose(cached[mask], full[mask], atol=1e-5)


def test_batched_greedy_generation_equals_one_at_a_time():
    model = sharpen(tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1)))
    img1, img2 = pixels(2)
    batch = [[img1, "A picture of"], ["x", img2, "y", img1], ["tiny"]]
    together = model.generate_ids(batch, max_new_tokens=8, temperature=0, eos=False)
    alone = [model.generate_ids([ex], max_new_tokens=8, temperature=0, eos=False)[0] for ex in batch]
    assert together == alone and all(len(r) == 8 for r in together)
    assert model.training  # generate switches to eval and back
    texts = model.generate(batch, max_new_tokens=8, temperature=0, eos=False)
    assert texts == [model.tokenizer.decode(r) for r in together]
    # top_k=1 is greedy whatever the temperature: the sampling flags reach sample_next
    assert model.generate_ids(batch, max_new_tokens=4, temperature=0.7, top_k=1, eos=False) == [r[:4] for r in together]
    # from embeddings made beforehand (in eval mode), as magma.py's command line does
    with torch.no_grad(), evaluating(model):
        x, mask = model.embed_batch(batch)
    assert model.generate_ids_from_embeds(x, mask, max_new_tokens=8, temperature=0, eos=False) == together
    for bad in ((x[0], mask), (x, mask[:, 1:]), (x, None)):
        with pytest.raises(ValueError, match=r"expected x \(B, T, C\) and its \(B, T\) key padding mask"):
            model.generate_ids_from_embeds(*bad)


def test_cached_greedy_generation_equals_uncached_recomputation():
    model = sharpen(tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))).eval()
    img1, img2 = pixels(2)
    example = [img1, "ab", img2, "c"]
    got = model.generate_ids([example], max_new_tokens=6, temperature=0, eos=False)[0]
    with torch.no_grad():
        prompt, ids = model.embed(example), []  # (T, C)
        for _ in range(6):  # re-run the whole sequence for every token: no cache
            x = torch.cat([prompt, model.lm.transformer.wte(torch.tensor(ids, dtype=torch.long))])
            ids.append(int(model.lm(inputs_embeds=x[None])[0, -1].argmax()))
    assert got == ids


def test_each_row_stops_at_its_own_eos():
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))
    batch = [[pixels(1)[0], "ab"], ["a longer prompt"]]
    sample = lambda eos: model.generate_ids(batch, max_new_tokens=12, temperature=1.0, top_p=1.0, eos=eos,
                                            generator=torch.Generator().manual_seed(0))
    free = sample(False)
    k = max(i for i, t in enumerate(free[0]) if t not in free[0][:i])  # a token row 0 first emits at step k
    stop = free[0][k]
    stopped = sample(stop)  # the same random draws; now `stop` is the end-of-text id
    assert stopped[0] == free[0][:k]
    assert stopped[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    # once every row has ended, decoding stops: here the first greedy token is the eos
    calls = []
    model.lm.lm_head.register_forward_hook(lambda *a: calls.append(1))  # once per position decoded
    first = model.generate_ids(batch[:1], max_new_tokens=12, temperature=0, eos=False)[0][0]
    assert len(calls) == 12  # prefill + 11 one-token steps
    calls.clear()
    assert model.generate_ids(batch[:1], max_new_tokens=12, temperature=0, eos=first) == [[]]
    assert len(calls) == 1  # the prefill only
    assert model.generate_ids(batch, max_new_tokens=0) == [[], []]
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -3"):
        model.generate_ids(batch, max_new_tokens=-3)


def test_training_loss_and_decode_step_trace_as_one_graph(monkeypatch):
    """No host read mid-step: torch.compile sees the training forward and a decode step each as one
    graph (a mask selection would split the first, a Python cache length the second)."""
    import torch._dynamo
    monkeypatch.setenv("MAGMA_ATTENTION", "sdpa")
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))
    ids, mask = captions(model.tokenizer, ["hello", "hi"])
    torch._dynamo.reset()
    try:
        loss = torch._dynamo.explain(model)(pixels(2), ids, mask)
        lm = model.lm.eval()
        prompt = torch.ones(2, 4, dtype=torch.bool)
        prompt[0, :2] = False
        with torch.no_grad():
            cache = lm.new_cache(2, 8)
            lm(torch.zeros(2, 4, dtype=torch.long), key_padding_mask=prompt, cache=cache)
            step = DecodeStep(lm, cache, prompt)
            decode = torch._dynamo.explain(lm.decode_step)(step.ids, cache, step.mask, step.slot)
    finally:
        torch._dynamo.reset()
    assert (loss.graph_count, loss.graph_break_count) == (1, 0), loss.break_reasons
    assert (decode.graph_count, decode.graph_break_count) == (1, 0), decode.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_generation_equals_eager(no_tf32):
    on_cpu = sharpen(tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))).eval()
    model = copy.deepcopy(on_cpu).cuda()
    batch = [[pixels(1)[0], "ab"], ["a longer prompt"], [pixels(1)[0]]]
    eager = model.generate_ids(batch, max_new_tokens=10, temperature=0, eos=False)
    assert eager == on_cpu.generate_ids(batch, max_new_tokens=10, temperature=0, eos=False)  # the GPU paths too
    assert model.generate_ids(batch, max_new_tokens=10, temperature=0, eos=False, cuda_graph=True) == eager
    stop = eager[1][4]  # rows end at their own eos with the graph too
    assert (model.generate_ids(batch, max_new_tokens=10, temperature=0, eos=stop, cuda_graph=True)
            == model.generate_ids(batch, max_new_tokens=10, temperature=0, eos=stop))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_top_k_and_top_p_keep_exactly_the_right_tokens(temperature):
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = (probs.log() * temperature).expand(4000, 4)  # at this temperature, these probabilities

    def support(**kw):
        g = torch.Generator().manual_seed(0)
        return set(sample_next(logits, temperature=temperature, generator=g, **kw).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_p=0.45) == {1}
    assert support(top_p=0.5) == {1}  # the top token alone reaches p
    assert support(top_p=0.75) == {1, 3}
    assert support(top_p=0.8) == {1, 3}  # 0.5 + 0.3 reaches 0.8 exactly: no third token
    assert support(top_p=0.81) == {1, 2, 3}
    assert support(top_k=1) == {1}
    assert support(top_k=3) == {1, 2, 3}
    assert support(top_k=3, top_p=0.6) == {1, 3}  # top-p over the renormalised top-k: 0.53, 0.32, 0.16
    assert sample_next(logits[:2], temperature=0).tolist() == [1, 1]


def write_hf_gpt2(directory, seed):
    """A random GPT-2 in the Hugging Face layout (config.json + pytorch_model.bin, Conv1D weights [in, out])."""
    torch.manual_seed(seed)
    sd = GPT(GPTConfig(**LM)).state_dict()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    hf = {k: (v.t().contiguous() if k.endswith(conv1d) else v.clone()) for k, v in sd.items() if k != "lm_head.weight"}
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "vocab_size": LM["vocab_size"], "n_positions": LM["block_size"],
                   "n_layer": LM["n_layer"], "n_head": LM["n_head"], "n_embd": LM["n_embd"]}, f)
    torch.save(hf, os.path.join(directory, "pytorch_model.bin"))
    return str(directory)


def write_openai_vit(path, seed):
    """A random ViT saved as an OpenAI CLIP state dict (visual.* names; heads = width // 64)."""
    from vit import ViT
    torch.manual_seed(seed)
    sd = ViT(ViTConfig(image_size=16, patch_size=8, width=64, layers=1, heads=1, embed_dim=16)).state_dict()
    ours_to_openai = {ours: theirs for theirs, ours in OPENAI_NAMES.items()}
    torch.save(rename(sd, ours_to_openai), path)
    return str(path)


def same_outputs(a, b):
    a.eval(), b.eval()
    ids, mask = captions(a.tokenizer, ["a red circle", "two"])
    with torch.no_grad():
        assert torch.equal(a(pixels(2), ids, mask), b(pixels(2), ids, mask))
        x = a.embed_batch([[pixels(1)[0], "ab"]])
        assert torch.equal(a.lm(inputs_embeds=x[0]), b.lm(inputs_embeds=b.embed_batch([[pixels(1)[0], "ab"]])[0]))


def test_save_load_self_contained(tmp_path):
    model = tiny_magma()
    sgd_steps(model)
    path = tmp_path / "ckpt.pt"
    model.save(str(path))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed into place
    saved = torch.load(path, weights_only=True)
    assert saved["includes"]["lm"] and "lm.transformer.h.0.attn.c_attn.weight" in saved["state_dict"]
    same_outputs(model, Magma.load(str(path)))


def test_save_with_extra_entries_and_load_what_was_read(tmp_path):
    """train.py's checkpoint: Magma.save's file plus its training state, written once and read once."""
    model = tiny_magma()
    sgd_steps(model)
    path = str(tmp_path / "ckpt.pt")
    model.save(path, extra={"train": {"step": 7, "moments": torch.ones(3)}})
    read = read_magma_checkpoint(path)
    assert read["train"]["step"] == 7 and torch.equal(read["train"]["moments"], torch.ones(3))
    os.remove(path)  # loading what was read does not touch the file again
    same_outputs(model, Magma.load(path, checkpoint=read))
    with pytest.raises(ValueError, match="'state_dict' is one of the checkpoint's own entries"):
        model.save(path, extra={"state_dict": {}})
    assert not os.listdir(tmp_path)


def test_save_load_with_a_learned_tokenizer(tmp_path):
    """A tiny LM's own BPE (tokenizer.train_bpe) travels in the checkpoint as its merge table."""
    tok = train_bpe(["a red circle", "a blue square", "a red square"] * 3, max_merges=50)
    torch.manual_seed(0)
    model = Magma(MagmaConfig(lm=GPTConfig(**dict(LM, vocab_size=tok.vocab_size)), vit=ViTConfig(**VIT)),
                  tokenizer=tok)
    assert model.config.tokenizer == {"merges": [list(p) for p in tok.merges]}
    model.save(str(tmp_path / "ckpt.pt"))
    loaded = Magma.load(str(tmp_path / "ckpt.pt"))
    assert isinstance(loaded.tokenizer, Tokenizer) and loaded.tokenizer.encoder == tok.encoder
    same_outputs(model, loaded)
    example = [[pixels(1)[0], "a red"]]
    assert loaded.generate(example, 5, temperature=0) == model.generate(example, 5, temperature=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    model = tiny_magma()
    path = tmp_path / "ckpt.pt"
    model.save(str(path))
    before = path.read_bytes()

    def crash_midway(obj, f):  # a write that dies half-way (disk full, killed process)
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    sgd_steps(model, steps=1)
    with pytest.raises(OSError, match="disk full"):
        model.save(str(path))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]  # old file intact, no debris


def test_a_pythia_folder_with_only_tokenizer_json(tmp_path):
    """GPT-NeoX / Pythia folders ship their tokenizer as tokenizer.json alone: Magma reads it from the LM's
    folder, encodes as Hugging Face `tokenizers` does, and a saved checkpoint finds it there again."""
    transformers = pytest.importorskip("transformers")
    from test_tokenizer import hf_tokenizer, neox_style_json, write_tokenizer_json
    spec = neox_style_json()
    hf_tok = hf_tokenizer(spec)
    config = transformers.GPTNeoXConfig(vocab_size=hf_tok.get_vocab_size(with_added_tokens=True) + 3,
                                        hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, rotary_pct=0.25)
    torch.manual_seed(0)
    lm_dir = str(tmp_path / "pythia")
    transformers.GPTNeoXForCausalLM(config).save_pretrained(lm_dir)
    write_tokenizer_json(lm_dir, spec)
    model = Magma.from_pretrained(lm=lm_dir, vit=write_openai_vit(tmp_path / "clip.pt", seed=1)).eval()
    prompt = "A photo of  two cats."
    assert model.tokenizer.encode(prompt) == hf_tok.encode(prompt, add_special_tokens=False).ids
    assert model.tokenizer.eos_id == 0 and model.config.tokenizer == lm_dir
    image = Image.new("RGB", (20, 16), (255, 0, 0))
    rows = model.generate_ids([[image, prompt]], max_new_tokens=6, temperature=0, eos=False)
    text = model.generate([[image, prompt]], max_new_tokens=6, temperature=0, eos=False)
    assert text == [hf_tok.decode(rows[0], skip_special_tokens=False)]
    model.save(str(tmp_path / "magma.pt"))
    same_outputs(model, Magma.load(str(tmp_path / "magma.pt")))


def test_save_load_onto_public_checkpoints(tmp_path):
    lm_dir, vit_file = write_hf_gpt2(tmp_path / "gpt2", seed=1), write_openai_vit(tmp_path / "clip.pt", seed=2)
    model = Magma.from_pretrained(lm=lm_dir, vit=vit_file, tokenizer="byte", freeze_vit=True)
    sgd_steps(model)
    path = str(tmp_path / "magma.pt")
    model.save(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(k.startswith("vit.") for k in state)  # frozen, from a file: not stored
    lm_keys = [k for k in state if k.startswith("lm.")]
    assert lm_keys and all(".adapter." in k for k in lm_keys)  # only the adapters of the LM
    assert any(k.startswith("prefix.") for k in state)
    same_outputs(model, Magma.load(path))
    same_outputs(model, Magma.load(path, lm=GPT.from_pretrained(lm_dir)))

    other = write_hf_gpt2(tmp_path / "other", seed=3)
    with pytest.raises(ValueError, match=f"LM weights at '{re.escape(other)}' differ .* trained on, from '{re.escape(lm_dir)}'"):
        Magma.load(path, lm=other)
    with pytest.raises(ValueError, match=f"LM weights given differ .* trained on, from '{re.escape(lm_dir)}'"):
        Magma.load(path, lm=GPT.from_pretrained(other))
    with pytest.raises(ValueError, match=f"ViT weights at '.*other_clip.pt' differ .* trained on, from '{re.escape(str(vit_file))}'"):
        Magma.load(path, vit=str(write_openai_vit(tmp_path / "other_clip.pt", seed=4)))
    os.rename(lm_dir, str(tmp_path / "moved"))
    with pytest.raises(ValueError, match=r"base LM .*gpt2.*pass lm="):
        Magma.load(path)
    same_outputs(model, Magma.load(path, lm=str(tmp_path / "moved")))


def test_a_loaded_checkpoint_saves_again_and_loads(tmp_path):
    """A file that holds a loadable LM's weights (include_lm=True): loaded, it keeps the fingerprint of
    those weights, not of the random skeleton they were copied into, so saving it again without them
    gives a file that loads onto the LM directory. Loading gives eval mode."""
    lm_dir = write_hf_gpt2(tmp_path / "gpt2", seed=1)
    model = Magma.from_pretrained(lm=lm_dir, vit=ViTConfig(**VIT), tokenizer="byte")
    assert not any(p.requires_grad for p in model.vit.ln_post.parameters())  # the prefix never reads it
    assert model.vit.proj is None or not model.vit.proj.requires_grad
    sgd_steps(model)
    model.save(str(tmp_path / "full.pt"), include_lm=True)
    loaded = Magma.load(str(tmp_path / "full.pt"))
    assert not loaded.training and loaded.base_fingerprint == model.base_fingerprint
    loaded.save(str(tmp_path / "again.pt"))  # default: the LM's weights left out, it has a path
    assert not any(k.startswith("lm.") and ".adapter." not in k
                   for k in torch.load(tmp_path / "again.pt", weights_only=True)["state_dict"])
    same_outputs(model, Magma.load(str(tmp_path / "again.pt")))


def test_bad_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        Magma.load(str(tmp_path / "nope.pt"))
    with pytest.raises(OSError, match="is a folder; give the ckpt.pt file in it"):  # e.g. train.py's --out_dir
        Magma.load(str(tmp_path))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pt.*not a readable MAGMA checkpoint"):
        Magma.load(str(garbage))
    good = tmp_path / "good.pt"
    tiny_magma().save(str(good))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(ValueError, match="truncated.pt"):
        Magma.load(str(truncated))
    with pytest.raises(ValueError, match="MagmaConfig.tokenizer"):
        Magma(MagmaConfig(lm=GPTConfig(**{**LM, "vocab_size": 50257}), vit=ViTConfig(**VIT)),
              tokenizer=Tokenizer({"a": 0, "<|endoftext|>": 1}, []))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="other.pt.*not a MAGMA checkpoint"):
        Magma.load(str(other))
    unversioned = torch.load(good, weights_only=True)
    del unversioned["version"]
    torch.save(unversioned, tmp_path / "unversioned.pt")
    with pytest.raises(ValueError, match="unversioned.pt.*not a MAGMA checkpoint"):
        Magma.load(str(tmp_path / "unversioned.pt"))
    future = torch.load(good, weights_only=True)  # a config field this code does not know
    future["config"] = json.dumps({**json.loads(future["config"]), "future_field": 1})
    torch.save(future, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="future.pt: bad config.*future_field"):
        Magma.load(str(tmp_path / "future.pt"))


def test_command_line(tmp_path, capsys, monkeypatch):
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))
    cli = lambda argv: main(["--device", "cpu", *argv])  # as on a machine without a GPU (a later --device wins)
    ckpt = str(tmp_path / "m.pt")
    model.save(ckpt)
    image = Image.new("RGB", (24, 20), (200, 30, 30))
    image.save(tmp_path / "a.png")
    vit_calls = []
    vit_forward = ViT.forward
    monkeypatch.setattr(ViT, "forward", lambda self, *a: vit_calls.append(1) or vit_forward(self, *a))
    text = cli(["--checkpoint", ckpt, "--image", str(tmp_path / "a.png"), "--prompt", "A picture of",
                "--temperature", "0", "--max-new-tokens", "5"])
    assert capsys.readouterr().out == text + "\n"
    assert len(vit_calls) == 1  # the image is encoded once: for the prompt's length and for generation
    monkeypatch.undo()
    assert text == model.generate([[clip_preprocess(image, 16), "A picture of"]], max_new_tokens=5, temperature=0)[0]

    # several images and prompts, interleaved in command-line order
    text = cli(["--checkpoint", ckpt, "--prompt", "x", "--image", str(tmp_path / "a.png"), "--prompt", "A",
                "--image", str(tmp_path / "a.png"), "--temperature", "0", "--max-new-tokens", "5"])
    pix = clip_preprocess(image, 16)
    assert text == model.generate([["x", pix, "A", pix]], max_new_tokens=5, temperature=0)[0]
    # the whole model in bf16: what the bf16 copy of the model says
    text = cli(["--checkpoint", ckpt, "--image", str(tmp_path / "a.png"), "--temperature", "0",
                "--max-new-tokens", "5", "--dtype", "bf16"])
    assert text == copy.deepcopy(model).to(torch.bfloat16).generate([[pix]], max_new_tokens=5, temperature=0)[0]
    capsys.readouterr()
    # this checkpoint holds the (random) LM and ViT: --lm and --vit are not used, and the user is told so
    text = cli(["--checkpoint", ckpt, "--prompt", "x", "--temperature", "0", "--max-new-tokens", "3",
                "--lm", "gpt2/", "--vit", "ViT-B-16.pt"])
    assert text == model.generate([["x"]], max_new_tokens=3, temperature=0)[0]
    assert capsys.readouterr().err.splitlines() == [
        "magma.py: note: the checkpoint holds the LM's weights; --lm is not used",
        "magma.py: note: the checkpoint holds the ViT's weights; --vit is not used"]

    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "bad.pt").write_bytes(b"\x00not a checkpoint" * 10)
    errors = [  # (arguments, what the error line names)
        (["--image", str(tmp_path / "missing.jpg")], "missing.jpg"),
        (["--image", str(tmp_path / "bad.jpg")], "bad.jpg"),
        (["--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"], "none.pt"),
        (["--checkpoint", str(tmp_path / "bad.pt"), "--prompt", "x"], "bad.pt"),  # torch's error: many lines
        (["--prompt", "x", "--device", "tpu9"], "--device 'tpu9'"),
        (["--prompt", "x", "--device", "meta"], "--device 'meta': generation runs on cpu, cuda or mps"),
        (["--prompt", "x", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA --device"),
        (["--prompt", "x", "--dtype", "fp8"], "--dtype"),
        (["--checkpoint", str(tmp_path), "--prompt", "x"], "is a folder; give the ckpt.pt file in it"),
        (["--image", str(tmp_path)], "is a folder"),
        # each bad value named with its flag; nan and inf would reach sampling (a traceback, or random bytes)
        (["--prompt", "x", "--temperature", "nan"], "--temperature=nan: must be a finite number >= 0"),
        (["--prompt", "x", "--temperature", "inf"], "--temperature=inf: must be a finite number >= 0"),
        (["--prompt", "x", "--temperature", "-1"], "--temperature=-1.0"),
        (["--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens=0"),
        (["--prompt", "x", "--max-new-tokens", "5000"], "--max-new-tokens=5000: the prompt fills"),
        (["--prompt", "x" * 300], "the prompt (images and text) takes"),
        (["--prompt", "x", "--top-k", "-1"], "--top-k=-1"),
        (["--prompt", "x", "--top-p", "nan"], "--top-p=nan"),
        (["--prompt", "x", "--top-p", "0"], "--top-p=0.0"),
    ]
    if not torch.cuda.is_available():
        errors.append((["--prompt", "x", "--device", "cuda"], "no CUDA GPU"))
    for args, message in errors:
        argv = args if "--checkpoint" in args else ["--checkpoint", ckpt] + args
        with pytest.raises(SystemExit):
            cli(argv)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 or lines[0].startswith("usage:"), lines  # argparse's usage, then its error
        assert lines[-1].startswith("magma.py: error: ") and message in lines[-1], lines


def test_command_line_as_a_user_runs_it(tmp_path):
    """`python magma.py ...` in a fresh process: a caption on stdout, or one error line and no traceback."""
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1))
    model.save(str(tmp_path / "m.pt"))
    image = Image.new("RGB", (24, 20), (200, 30, 30))
    image.save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ckpt, greedy = ["--checkpoint", "m.pt", "--device", "cpu"], ["--temperature", "0", "--max-new-tokens", "5"]
    runs = {  # name: (arguments, rc, what the one stderr line names)
        "caption": (ckpt + ["--image", "a.png", "--prompt", "A picture of"], 0, None),
        "few_shot": (ckpt + ["--image", "a.png", "--prompt", "A red.", "--image", "a.png", "--prompt", "A"] + greedy,
                     0, None),
        "help": (["--help"], 0, None),
        "missing_image": (ckpt + ["--image", "missing.png", "--prompt", "A"], 1, "missing.png"),
        "corrupt_image": (ckpt + ["--image", "bad.png"], 1, "bad.png"),
        "missing_checkpoint": (["--checkpoint", "none.pt", "--image", "a.png"], 1, "none.pt"),
    }
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "magma.py"), *args], cwd=tmp_path,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, _, _) in runs.items()}  # all at once: each pays for importing torch
    results = {name: (*(s.decode() for s in p.communicate(timeout=600)), p.returncode) for name, p in procs.items()}
    for name, (args, rc, names) in runs.items():
        out, err, code = results[name]
        assert code == rc and "Traceback" not in err, (name, code, err)
        if rc == 0:
            assert err == "" and out.endswith("\n"), (name, err)
        else:
            assert out == "" and len(err.splitlines()) == 1 and err.startswith("magma.py: error: ") \
                and names in err, (name, err)
    pix = clip_preprocess(image, 16)
    assert results["few_shot"][0] == model.generate([[pix, "A red.", pix, "A"]], max_new_tokens=5,
                                                    temperature=0)[0] + "\n"
    assert all(flag in results["help"][0] for flag in ("--checkpoint", "--image", "--prompt", "--top-p"))


# ------------------------------------------------------------------------------------------------
# The loss's fused cross-entropy kernels: dispatch on CPU; the kernels under the Triton interpreter,
# in a subprocess (TRITON_INTERPRET=1 must be set before triton is imported) that runs this file's
# test_interpreted_* tests, which exist only there; and in bf16 on a GPU.
# ------------------------------------------------------------------------------------------------

def ce_inputs(N, V, dtype=torch.float32, device="cpu", seed=0, spread=8.0, offset=0.0):
    """Logits (N, V) with a wide spread (several rescales of the running maximum along a row) around
    `offset` (exp(x) alone would overflow at 1000), targets with row 0 ignored."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, V, generator=g) * spread + offset).to(device=device, dtype=dtype)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    if N:
        t[0] = -100
    return x, t


def test_cross_entropy_dispatch_and_errors(monkeypatch):
    x, t = ce_inputs(6, 50)
    want = F.cross_entropy(x, t, reduction="none")
    for impl in (None, "auto", "torch"):
        assert torch.equal(cross_entropy(x, t, impl=impl), want)  # on CPU: PyTorch's, fp32
    assert torch.equal(cross_entropy(x.bfloat16(), t), F.cross_entropy(x.bfloat16().float(), t, reduction="none"))
    assert want[0] == 0 and (want[1:] > 0).all()
    with pytest.raises(ValueError, match="unknown cross-entropy implementation 'fast'.*MAGMA_CROSS_ENTROPY"):
        cross_entropy(x, t, impl="fast")
    monkeypatch.setenv("MAGMA_CROSS_ENTROPY", "kernel")
    with pytest.raises(ValueError, match="'kernel'"):
        cross_entropy(x, t)
    monkeypatch.setenv("MAGMA_CROSS_ENTROPY", "torch")
    with pytest.raises(ValueError, match=r"logits \(N, V\) with V >= 1 and targets \(N,\); got \(6, 50\) and \(5,\)"):
        cross_entropy(x, t[:5])
    with pytest.raises(ValueError, match=r"got \(6, 0\)"):
        cross_entropy(x[:, :0], t)
    with pytest.raises(ValueError, match="targets must be int64 or int32 .* got torch.float32"):
        cross_entropy(x, t.float())
    assert torch.equal(cross_entropy(x, t.int()), want)  # int32 ids too, on either path
    if not INTERPRET:  # CPU tensors need the interpreter (or Triton itself is missing): one clear line
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET|needs Triton"):
            cross_entropy(x, t, impl="triton")


def same_loss_with_either_cross_entropy(monkeypatch, device, loss_tol, grad_tol, autocast=None):
    """The captioning loss and every trained parameter's gradient of one step, through PyTorch's
    cross-entropy and through magma's kernels (MAGMA_CROSS_ENTROPY), agree within the tolerances."""
    model = tiny_magma(adapters=AdapterConfig(init="normal", init_std=0.1)).to(device)
    ids, mask = captions(model.tokenizer, ["hello", "hi"])
    results = {}
    for impl in ("torch", "triton"):
        monkeypatch.setenv("MAGMA_CROSS_ENTROPY", impl)
        model.zero_grad()
        torch.manual_seed(0)  # the same prefix-dropout mask
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(pixels(2).to(device), ids.to(device), mask.to(device))
        loss.backward()
        results[impl] = loss.detach(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                        if p.grad is not None}
    (l0, g0), (l1, g1) = results["torch"], results["triton"]
    torch.testing.assert_close(l1, l0, rtol=loss_tol, atol=loss_tol)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **grad_tol, msg=name)


if INTERPRET:  # collected only in the interpreter's subprocess (test_cross_entropy_kernels_interpreted)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
    @pytest.mark.parametrize("N,V,offset", [(1, 1, 0.0), (5, 31, 0.0), (7, 32, 0.0), (6, 100, 1000.0),
                                            (3, 257, -50.0)])
    def test_interpreted_kernels_equal_pytorch(dtype, N, V, offset):
        """Loss and gradient, per-row weights and a summed loss (a broadcast, stride-0 gradient), on
        vocabularies of one loop step, a ragged one, and several (the interpreter's steps are 32 wide)."""
        x, t = ce_inputs(N, V, dtype, offset=offset)
        x.requires_grad_()
        ours = cross_entropy(x, t, impl="triton")
        ref = F.cross_entropy(x.float(), t, reduction="none")  # fp32, from the same 16-bit values
        assert ours.dtype == torch.float32
        # x - lse rounds to fp32 steps of the logits' size (6e-5 near 1000) in either implementation
        rounding = 4 * 2 ** -23 * x.abs().max().item()
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=2e-6 + rounding)
        assert ours[0] == 0  # the ignored row
        w = torch.randn(N, generator=torch.Generator().manual_seed(1))
        for total in (lambda loss: loss @ w, lambda loss: loss.sum()):  # the sum's gradient has stride 0
            got = torch.autograd.grad(total(ours), x, retain_graph=True)[0]
            want = torch.autograd.grad(total(ref), x, retain_graph=True)[0]
            assert got.dtype == dtype and not got[0].any()  # nothing flows from the ignored row
            tol = dict(rtol=1e-5 + rounding, atol=1e-7) if dtype == torch.float32 else {}  # fp16: one rounding
            torch.testing.assert_close(got, want, **tol)

    def test_interpreted_kernels_edge_cases():
        x, t = ce_inputs(4, 70)
        wide = torch.zeros(4, 90)  # a row stride other than V, as a slice of wider logits gives
        wide[:, :70] = x
        torch.testing.assert_close(cross_entropy(wide[:, :70], t, impl="triton"),
                                   F.cross_entropy(x, t, reduction="none"), rtol=1e-6, atol=2e-6)
        columns = x.t().contiguous().t()  # column-major: copied to rows first
        torch.testing.assert_close(cross_entropy(columns, t, impl="triton"),
                                   F.cross_entropy(x, t, reduction="none"), rtol=1e-6, atol=2e-6)
        # a masked vocabulary: -inf logits, a whole loop step of them first (the running maximum is
        # -inf until a finite one comes), in an ignored row too, whose gradient must stay exactly 0
        masked = x.clone()
        masked[:, :40] = float("-inf")
        masked[:, 45] = float("-inf")
        masked.requires_grad_()
        t_masked = torch.tensor([-100, 50, 41, 69])
        got = cross_entropy(masked, t_masked, impl="triton")
        want = F.cross_entropy(masked.float(), t_masked, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
        got.sum().backward()
        assert masked.grad.isfinite().all() and not masked.grad[0].any() and not masked.grad[:, :40].any()
        # every row ignored: zero loss, zero gradient; no rows at all: empty
        x.requires_grad_()
        none = cross_entropy(x, torch.full((4,), -100), impl="triton")
        none.sum().backward()
        assert not none.any() and not x.grad.any()
        assert cross_entropy(torch.zeros(0, 70), torch.zeros(0, dtype=torch.long), impl="triton").shape == (0,)
        # a target outside the vocabulary: NaN, never a plausible number (PyTorch raises there)
        bad = cross_entropy(x.detach(), torch.tensor([1, 70, -1, 2]), impl="triton")
        assert bad[[0, 3]].isfinite().all() and bad[[1, 2]].isnan().all()

    def test_interpreted_magma_loss_and_gradients_equal_pytorch(monkeypatch):
        """The captioning loss through the kernels (MAGMA_CROSS_ENTROPY=triton) against PyTorch's."""
        same_loss_with_either_cross_entropy(monkeypatch, "cpu", loss_tol=1e-6, grad_tol=dict(rtol=1e-4, atol=1e-6))


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason="needs triton")
def test_cross_entropy_kernels_interpreted(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "interpreted_"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b12 passed\b", proc.stdout), proc.stdout[-2000:]  # 10 + 2, none skipped


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_cross_entropy_kernels_bf16():
    """GPT-2's vocabulary in bf16: the loss equals PyTorch's fp32 loss on the same values, and the
    gradient PyTorch's fp32 gradient rounded to bf16 (at most one bf16 step apart)."""
    x, t = ce_inputs(512, 50257, torch.bfloat16, device="cuda", spread=3.0)
    t[1::7] = -100
    x.requires_grad_()
    ours = cross_entropy(x, t)  # auto: the kernels on CUDA
    ref = F.cross_entropy(x.float(), t, reduction="none")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(ours.sum(), x)[0]
    want = torch.autograd.grad(ref.sum(), x)[0]  # fp32 math, cast to bf16 by .float()'s backward
    assert got.dtype == torch.bfloat16 and not got[1::7].any()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_magma_loss_equal_with_either_cross_entropy(monkeypatch):
    """Training under bf16 autocast on a GPU: the captioning loss and the gradients of the trained
    parameters through magma's kernels match PyTorch's cross-entropy (the same bf16 logits feed both)."""
    # the logits' gradient may differ by one bf16 rounding step, and so the parameters' a little
    same_loss_with_either_cross_entropy(monkeypatch, "cuda", loss_tol=1e-5, grad_tol=dict(rtol=2e-2, atol=1e-4),
                                        autocast=torch.bfloat16)
