"""The GPT decoder (GPT-2, GPT-J and GPT-NeoX families) and its loaders for public checkpoints.

    ids (B, T) -> wte [+ wpe, GPT-2 only] -> n_layer blocks -> ln_f -> lm_head -> logits (B, T, vocab)

Every block is pre-LayerNorm. GPT-2: x + attn(ln_1(x)), then + mlp(ln_2(.)). GPT-J, the decoder MAGMA
uses (arXiv 2112.05253): x + attn(ln_1(x)) + mlp(ln_1(x)), one norm for both branches.
GPT-NeoX: the same parallel sum with two norms, or GPT-2's sequential wiring. GPT-J and NeoX give
positions by rotating q and k (rotary embedding) instead of adding a learned table.

The file reads top to bottom: config, rotary embedding, the model (KV cache, generation), the
fixed-shape decode step (CUDA graphs), sampling, checkpoint readers, the Hugging Face loaders (one
name table per family), and the command line.

    python gpt.py PATH --prompt "Hello" [--compare]     # sanity check of a downloaded checkpoint
"""
import argparse
import importlib.util
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention import attention

# ----------------------------------------------------------------------------------------------------
# Configuration: one dataclass, three families. The family fixes how positions enter and how a block
# is wired; the table below gives the defaults a family sets for the fields left as None.

FAMILIES = {
    #              rotary: how q/k are rotated (None = learned absolute positions instead)
    #              shared_ln: one LayerNorm feeds both attention and MLP (GPT-J's parallel block)
    "gpt2":     dict(rotary=None, shared_ln=False, parallel_residual=False, attn_bias=True,
                     lm_head_bias=False, tie_word_embeddings=True, activation="gelu_new"),
    "gptj":     dict(rotary="interleaved", shared_ln=True, parallel_residual=True, attn_bias=False,
                     lm_head_bias=True, tie_word_embeddings=False, activation="gelu_new"),
    "gpt_neox": dict(rotary="half", shared_ln=False, parallel_residual=True, attn_bias=True,
                     lm_head_bias=False, tie_word_embeddings=False, activation="gelu"),
}

ACTIVATIONS = {  # Hugging Face's activation names -> function
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,  # exact, erf-based (GPT-NeoX)
    "relu": F.relu,
}


@dataclass
class GPTConfig:
    """Shape and family of a GPT decoder. Fields left as None take the family's value (FAMILIES)."""
    model_type: str = "gpt2"                # "gpt2" | "gptj" | "gpt_neox"
    vocab_size: int = 50257
    block_size: int = 1024                  # longest sequence: GPT-2's table of learned positions; rotary
                                            # models are not stopped there (untrained beyond it)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None              # MLP width; None = 4 * n_embd
    activation: str | None = None           # a key of ACTIVATIONS
    layer_norm_eps: float = 1e-5
    rotary_dim: int | None = None           # rotated dims per head; None = all (GPT-J) or a quarter (NeoX)
    rotary_base: float = 10000.0
    parallel_residual: bool | None = None   # x + attn(ln(x)) + mlp(ln'(x)) instead of two residual steps
    attn_bias: bool | None = None           # biases on the qkv and output projections
    lm_head_bias: bool | None = None
    tie_word_embeddings: bool | None = None  # lm_head shares the token embedding matrix
    scale_attn_weights: bool = True         # GPT-2 flags: divide scores by sqrt(head dim) ...
    scale_attn_by_inverse_layer_idx: bool = False  # ... and by layer index + 1
    dropout: float = 0.0                    # on embeddings and residual branches (none on attention
                                            # probabilities); the loaders leave it 0: MAGMA's LM is frozen

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"unknown model_type {self.model_type!r}; supported: {sorted(FAMILIES)}")
        for key, value in FAMILIES[self.model_type].items():
            if key in ("rotary", "shared_ln"):  # not fields: fixed by the family, read by the properties below
                continue
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; supported: {sorted(ACTIVATIONS)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        head_dim = self.n_embd // self.n_head
        if self.rotary is None:
            self.rotary_dim = 0
        elif self.rotary_dim is None:
            self.rotary_dim = head_dim if self.model_type == "gptj" else head_dim // 4
        if self.rotary and not (0 < self.rotary_dim <= head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and in 1..head dim {head_dim}")
        if self.shared_ln and not self.parallel_residual:
            raise ValueError(f"{self.model_type} has one LayerNorm per block, so parallel_residual must be True")

    @property
    def rotary(self):
        """How q and k are rotated: "interleaved" (GPT-J), "half" (NeoX), None (learned positions)."""
        return FAMILIES[self.model_type]["rotary"]

    @property
    def shared_ln(self):
        """True when one LayerNorm feeds both branches of a block (GPT-J)."""
        return FAMILIES[self.model_type]["shared_ln"]


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding (Su et al. 2021): rotate pairs of query/key dims by an angle that grows
# with the position, so q.k depends on the distance between positions. GPT-J pairs neighbouring dims
# (0,1), (2,3), ...; NeoX pairs dim i with dim i + R/2 ("rotate half"). Same maths, different layout
# of the weights, so a checkpoint only works with its own convention.

def rotary_cos_sin(positions, rotary_dim, base, dtype):
    """cos and sin of the rotation angles, each (B or 1, 1, T, rotary_dim/2), for positions (B or 1, T)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device,
                                            dtype=torch.float32) / rotary_dim))  # (R/2,)
    angles = positions.float()[..., None] * inv_freq  # (B, T, R/2)
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def apply_rotary(x, cos, sin, style):
    """Rotate the first rotary_dim dims of each head of x (B, H, T, D); the rest pass through."""
    R = 2 * cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # made in the residual stream's dtype; under autocast q/k are lower
    rot, rest = x[..., :R], x[..., R:]
    if style == "interleaved":
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :R // 2], rot[..., R // 2:]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # (B, H, T, R/2) each
    # interleaved: stack + flatten puts y1[i], y2[i] back at dims 2i, 2i+1; half: y1 then y2
    rot = torch.stack((y1, y2), dim=-1).flatten(-2) if style == "interleaved" else torch.cat((y1, y2), -1)
    return torch.cat((rot, rest), dim=-1)


# ----------------------------------------------------------------------------------------------------
# The model.

class KVCache:
    """Preallocated keys and values of every layer, (B, H, max_len, D) each; `length` are filled.

    Two ways to write. Prefill (and any call of GPT.forward) appends T positions after `length` and
    attends to the filled ones. A fixed-shape decode step (GPT.decode_step) sets `slot`, a (1,) tensor:
    each layer then writes its one new position there and attends to all max_len slots, the caller's
    mask hiding the unfilled ones; nothing about the call depends on a Python number that changes.
    Decode steps leave `length` at the prompt's: DecodeStep's slot and mask track what they filled, so
    after them the cache belongs to DecodeStep (a GPT.forward would write over those slots).
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0
        self.max_len = max_len
        self.slot = None  # set only during GPT.decode_step

    def update(self, layer, k, v):
        """Write this step's k, v (B, H, T, D); return the keys and values to attend to."""
        K, V = self.k[layer], self.v[layer]
        if self.slot is not None:  # fixed-shape decode: T == 1, written at slot, every slot returned
            K.index_copy_(2, self.slot, k.to(K.dtype))
            V.index_copy_(2, self.slot, v.to(V.dtype))
            return K.to(k.dtype), V.to(v.dtype)  # (B, H, max_len, D)
        end = self.length + k.shape[2]
        K[:, :, self.length:end] = k
        V[:, :, self.length:end] = v
        # (B, H, length+T, D); the cast is a no-op unless autocast computes k, v in another dtype
        return K[:, :, :end].to(k.dtype), V[:, :, :end].to(v.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, except that a bf16/fp16 model under autocast normalises in its own dtype.

    CUDA autocast runs every LayerNorm in fp32: a bf16 input is copied to fp32 and the fp32 output
    is copied back to bf16 by the matmul that reads it, with the same round trip again for the
    gradient. When the input already has the weights' dtype, the plain kernel is used instead: it
    accumulates the mean and variance in fp32 and rounds once at the end: the bf16 numbers the matmul
    would have read (to fp32 rounding), without the fp32 copies of a (B, T, C) tensor."""

    def forward(self, x):
        if x.dtype == self.weight.dtype and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x)
        return super().forward(x)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection laid out as [q; k; v]."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.layer_idx = config.n_head, layer_idx
        self.rotary = config.rotary
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.attn_bias)
        self.dropout = nn.Dropout(config.dropout)
        head_dim = config.n_embd // config.n_head
        self.scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1

    def forward(self, x, rope=None, key_padding_mask=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rope is not None:
            q, k = apply_rotary(q, *rope, self.rotary), apply_rotary(k, *rope, self.rotary)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H, T_past + T, D)
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block, sequential (GPT-2) or parallel (GPT-J, NeoX) residual."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.parallel = config.parallel_residual
        self.ln_1 = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        if not config.shared_ln:
            self.ln_2 = LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, key_padding_mask=None, cache=None):
        h = self.ln_1(x)
        a = self.attn(h, rope, key_padding_mask, cache)
        if not self.parallel:  # x + attn(ln_1(x)), then + mlp(ln_2(.))
            x = x + a
            return x + self.mlp(self.ln_2(x))
        # Parallel: both branches read the block input; GPT-J normalises it once, NeoX twice.
        return x + a + self.mlp(self.ln_2(x) if hasattr(self, "ln_2") else h)


class GPT(nn.Module):
    """A decoder-only transformer language model: GPT-2, GPT-J or GPT-NeoX, by config.model_type."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.rotary is None:
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(drop=nn.Dropout(config.dropout),
                      h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                      ln_f=LayerNorm(config.n_embd, eps=config.layer_norm_eps))
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: the residual projections' init scaled by 1/sqrt(N), N = 2 * n_layer
        # residual additions
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.tie_weights()

    def tie_weights(self):
        """Share the token embedding with the output head where the family does (GPT-2)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """An empty KV cache for `batch_size` sequences of up to `max_len` tokens."""
        p = self.transformer.wte.weight
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head,
                       device=device or p.device, dtype=dtype or p.dtype)

    def positions(self, T, past, key_padding_mask, device):
        """Position of each new token (B or 1, T): the number of real tokens before it in its row."""
        if key_padding_mask is None:
            return (past + torch.arange(T, device=device))[None]  # (1, T)
        # Left padding must not shift positions: count only real tokens (pads get 0, never seen).
        return (key_padding_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, T)

    def forward(self, idx=None, *, inputs_embeds=None, key_padding_mask=None, cache=None, return_hidden=False):
        """Logits (B, T, vocab) for token ids idx (B, T) or embeddings inputs_embeds (B, T, C).

        key_padding_mask (B, T_past + T) bool marks real tokens (True) over cached and new positions.
        With a cache, the new keys/values are written after the cached ones and cache.length advances.
        return_hidden=True returns the final hidden states (B, T, C) after ln_f instead of logits.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx and inputs_embeds")
        x = self.transformer.wte(idx) if idx is not None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        past = 0 if cache is None else cache.length
        if cache is not None and (past + T > cache.max_len or cache.k[0].shape[0] != B):
            raise ValueError(f"KV cache holds {cache.k[0].shape[0]} x {cache.max_len} positions, "
                             f"{past} used; cannot add a batch of {B} x {T}")
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (B, past + T):
                raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, "
                                 f"expected (B, T_past + T) = {(B, past + T)}")
            key_padding_mask = key_padding_mask.to(device=x.device, dtype=torch.bool)
        pos = self.positions(T, past, key_padding_mask, x.device)
        rope = None
        if self.config.rotary is None:
            if past + T > self.config.block_size:
                raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
            x = x + self.transformer.wpe(pos)
        else:
            rope = rotary_cos_sin(pos, self.config.rotary_dim, self.config.rotary_base, x.dtype)
        if key_padding_mask is not None and bool(key_padding_mask.all()):
            key_padding_mask = None  # nothing to mask: lets attention take its fastest path
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, key_padding_mask, cache)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    def decode_step(self, idx, cache, key_padding_mask, slot):
        """Logits (B, vocab) in float32 for one new token per row, at shapes that never change.

        idx (B, 1) token ids; key_padding_mask (B, cache.max_len) bool, True on the filled real slots;
        slot (1,) long, the cache slot this token fills. In place, the mask gains the slot and slot
        advances by one, so the same call with the same tensors produces the next token (DecodeStep).
        """
        key_padding_mask.index_fill_(1, slot, True)
        pos = key_padding_mask.sum(1, keepdim=True) - 1  # (B, 1): the real tokens before this one
        x = self.transformer.wte(idx)  # (B, 1, C)
        rope = None
        if self.config.rotary is None:
            x = x + self.transformer.wpe(pos)
        else:
            rope = rotary_cos_sin(pos, self.config.rotary_dim, self.config.rotary_base, x.dtype)
        cache.slot = slot
        try:
            for block in self.transformer.h:
                x = block(x, rope, key_padding_mask, cache)  # attends to all max_len slots, masked
        finally:
            cache.slot = None
        slot.add_(1)
        return self.lm_head(self.transformer.ln_f(x)[:, -1]).float()  # (B, vocab)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                 key_padding_mask=None, cuda_graph=False):
        """Continue idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        Prefill the KV cache once, then feed one token at a time (DecodeStep and EOS_CHECK_EVERY below;
        cuda_graph=True replays each step as a CUDA graph; sample_next in the section after). Batches
        are LEFT-padded, with key_padding_mask (B, T) marking real tokens (the pads must still be valid
        token ids, e.g. 0). temperature=0 is greedy. A row that has emitted eos_id keeps emitting eos_id.
        """
        B, T = idx.shape
        mask = (torch.ones_like(idx, dtype=torch.bool) if key_padding_mask is None
                else key_padding_mask.to(device=idx.device, dtype=torch.bool))
        if not bool((mask[:, -1] | ~mask.any(1)).all()):  # a right-padded row would continue from a pad
            raise ValueError("generate needs LEFT-padded prompts: key_padding_mask's last column must be True "
                             "in every row that has a real token")
        if max_new_tokens <= 0:
            return idx
        # The last new token is returned, not fed back: T + max_new_tokens - 1 positions are run.
        if self.config.rotary is None and T + max_new_tokens - 1 > self.config.block_size:
            raise ValueError(f"{T} prompt tokens + {max_new_tokens} new ones need {T + max_new_tokens - 1} "
                             f"positions; this LM has {self.config.block_size} (learned positions)")
        cache = self.new_cache(B, T + max_new_tokens - 1)
        hidden = self(idx, key_padding_mask=mask, cache=cache, return_hidden=True)  # prefill: (B, T, C)
        logits = self.lm_head(hidden[:, -1]).float()  # (B, vocab): the last position only
        step = DecodeStep(self, cache, mask, cuda_graph=cuda_graph)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out = [idx]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out.append(nxt[:, None])
            if i == max_new_tokens - 1:
                break
            if eos_id is not None and i % EOS_CHECK_EVERY == 0 and bool(done.all()):  # all finished: pad, stop
                out.append(torch.full((B, max_new_tokens - i - 1), eos_id, dtype=idx.dtype, device=idx.device))
                break
            logits = step(nxt[:, None])
        return torch.cat(out, dim=1)

    @classmethod
    def from_pretrained(cls, path, dtype=None):
        """Load a Hugging Face model directory (config.json + weights) of a supported family.

        dtype: the parameter dtype; None keeps the dtype the weights are stored in (GPT-J and Pythia
        files are often fp16: on a CPU pass torch.float32, for speed and for fp32 parity checks).
        """
        config = config_from_hf(path)
        state, origin, source = read_hf_weights(path)
        ours = convert_checkpoint(state, origin, config, source)
        dtype = dtype or ours["transformer.wte.weight"].dtype
        with torch.device("meta"):  # no time or memory spent on random init of weights we overwrite
            model = cls(config).to(dtype)
        model = model.to_empty(device="cpu")
        model.tie_weights()  # to_empty gave every parameter new storage, untying lm_head from wte
        load_checked(model, ours, source)
        return model.eval()


# ----------------------------------------------------------------------------------------------------
# Decoding one token at a time. After the prompt is prefilled, every step has the same shapes, so it can
# be recorded once as a CUDA graph and replayed: one launch per token instead of a dozen per layer,
# which is what bounds small-batch decoding on a GPU (the GPU waits for Python, not the reverse). The
# price of fixed shapes: every step attends to all max_len slots (the unfilled ones masked), not only
# to the filled ones, so a step costs what the last one would.

# With an eos, generation asks the device whether every row has finished only every EOS_CHECK_EVERY
# steps: each question makes the host wait for the GPU, which could otherwise queue steps ahead. A row
# that finished keeps emitting eos meanwhile, so the result is the same; a batch may run up to that
# many steps more than it needs.
EOS_CHECK_EVERY = 8


class DecodeStep:
    """step(ids (B, 1)) -> logits (B, vocab) float32 of the next position, for a prefilled KV cache.

    Owns the fixed-shape state GPT.decode_step reads: the key mask over all cache slots (the prompt's
    mask, then False) and the slot to write. With cuda_graph=True (CUDA only, no autocast) the first
    call records the step as a CUDA graph; every call copies the ids in and replays it. The returned
    logits are then the graph's own output buffer: use them before the next call.
    """

    def __init__(self, lm, cache, prompt_mask, cuda_graph=False):
        B, T = prompt_mask.shape  # (B, T) real tokens of the prefilled prompt
        device = cache.k[0].device
        if cache.length != T:
            raise ValueError(f"DecodeStep needs a cache prefilled with the prompt's {T} positions, "
                             f"it holds {cache.length}")
        if lm.config.rotary is None and cache.max_len > lm.config.block_size:
            raise ValueError(f"a KV cache of {cache.max_len} positions exceeds the LM's block_size "
                             f"{lm.config.block_size} (its table of learned positions)")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        if cuda_graph and torch.is_autocast_enabled("cuda"):
            raise ValueError("cuda_graph=True cannot record under autocast: hold the model in the "
                             "dtype to decode in instead (e.g. model.to(torch.bfloat16))")
        self.lm, self.cache, self.cuda_graph = lm, cache, cuda_graph
        self.mask = torch.zeros(B, cache.max_len, dtype=torch.bool, device=device)  # (B, max_len)
        self.mask[:, :T] = prompt_mask
        self.slot = torch.full((1,), T, dtype=torch.long, device=device)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.steps_left = cache.max_len - T
        self.graph = None

    @torch.no_grad()
    def _run(self):
        return self.lm.decode_step(self.ids, self.cache, self.mask, self.slot)

    def _capture(self):
        # Run the step twice on a side stream first (cuBLAS picks its workspaces, Triton compiles), as
        # capture requires. Those runs write the next slot and advance the slot; both are put back, and
        # that slot is written again by the real step before anything reads it.
        device = self.slot.device
        mask, slot = self.mask.clone(), self.slot.clone()
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
                    self.mask.copy_(mask)
                    self.slot.copy_(slot)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # Records the kernels without running them; "thread_local" lets other threads (a DataLoader's
            # pinning thread) go on meanwhile.
            with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                self.logits = self._run()

    def __call__(self, ids):
        if self.steps_left <= 0:
            raise ValueError(f"the KV cache is full ({self.cache.max_len} positions)")
        self.steps_left -= 1
        self.ids.copy_(ids)
        if not self.cuda_graph:
            return self._run()
        if self.graph is None:  # recorded at the first call: a step that never runs costs nothing
            self._capture()
        self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------------------------------
# Sampling (used by GPT.generate and magma.py).

def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit not among the top-k, or not in the top-p nucleus of the tokens top-k
    kept; logits (B, V)."""
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None = off), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 or None = off), got {top_p}")
    keep = torch.ones_like(logits, dtype=torch.bool)
    if top_k:
        idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
        keep = torch.zeros_like(keep).scatter_(-1, idx, True)  # exactly k tokens, even with ties
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more probable tokens
        # Keep a token while the mass before it is still short of p: the smallest set reaching p.
        # The slack absorbs float rounding (0.5 + 0.3 reaches 0.8, whatever softmax rounds to).
        sorted_keep = mass_before < top_p - 1e-6
        sorted_keep[:, 0] = True
        keep = keep & torch.zeros_like(keep).scatter_(-1, order, sorted_keep)
    return logits.masked_fill(~keep, float("-inf"))


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token id (B,) from logits (B, V): greedy at temperature 0, else sample."""
    if not 0 <= temperature < math.inf:  # also nan, which fails every comparison
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------
# Reading checkpoint files: our own safetensors reader (the safetensors package is not needed at run
# time), torch pickles, and the checked copy into a model. vit.py and magma.py use these too.

SAFETENSORS_DTYPES = {  # safetensors dtype name -> (numpy dtype to read the bytes as, torch dtype)
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),  # numpy has no bfloat16: read the raw 16 bits, reinterpret
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}


def read_safetensors(path):
    """Read a .safetensors file into {name: tensor}.

    The format: 8 bytes little-endian header length n, n bytes of JSON mapping each tensor name to
    {dtype, shape, data_offsets: [begin, end]} (offsets into the data that follows), then raw
    little-endian tensor bytes. An optional "__metadata__" entry holds strings. The file is memory
    mapped, so a multi-GB checkpoint is copied once (into the tensors), not twice.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = os.path.getsize(path)
    if size < 8:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int.from_bytes(raw[:8].tobytes(), "little")
    if n <= 0 or 8 + n > size:
        raise ValueError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
    try:
        header = json.loads(raw[8:8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype}; "
                             f"supported: {sorted(SAFETENSORS_DTYPES)}")
        np_dtype, torch_dtype = SAFETENSORS_DTYPES[dtype]
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= len(data)) or end - begin != count * np.dtype(np_dtype).itemsize:
            raise ValueError(f"{path}: tensor {name!r} has offsets {begin}..{end} that do not fit "
                             f"shape {shape} of {dtype} in {len(data)} data bytes")
        array = np.frombuffer(data[begin:end], dtype=np.dtype(np_dtype).newbyteorder("<"), count=count)
        tensor = torch.from_numpy(array.astype(np_dtype, copy=True)).reshape(shape)
        out[name] = tensor.view(torch_dtype) if dtype == "BF16" else tensor
    return out


def read_checkpoint_file(path):
    """Read a .safetensors file or a torch pickle (.bin/.pt) holding a state dict."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own message is a page about weights_only
        raise ValueError(f"{path}: not a PyTorch state dict (unpickling tensors failed: another file type, "
                         f"a corrupt file, or one holding Python objects besides tensors)") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence
        raise ValueError(f"{path}: could not read as a PyTorch state dict ({type(e).__name__}: {first})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def load_checked(model, state_dict, source, expected=None, names=None):
    """Copy `state_dict` (already in our names) into `model`, refusing anything that does not fit.

    Every parameter and persistent buffer of the model (or only the names in `expected`, for a
    checkpoint that holds part of a model) must be present with the right shape, and nothing may be
    left over: a missing, unexpected or mis-shaped tensor raises an error naming it and `source`
    (the file it came from). `names` ({our name: the file's name}) makes the errors use the name the
    user can find in the file.
    """
    own = model.state_dict()
    expected = set(own) if expected is None else set(expected)
    theirs = lambda name: (names or {}).get(name, name)
    missing = sorted(theirs(n) for n in expected - set(state_dict))
    unexpected = sorted(theirs(n) for n in set(state_dict) - expected)
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{source}: tensor {theirs(name)!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(own[name].shape)}")
    with torch.no_grad():
        for name, tensor in state_dict.items():
            own[name].copy_(tensor)
    return model


# ----------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints.
#
# One table from checkpoint names to ours, "{i}" standing for the layer index. The third column says
# how the tensor is converted:
#   "T"          GPT-2's Conv1D stores weights [in, out]: transpose to nn.Linear's [out, in].
#   "q","k","v"  GPT-J's separate projections: stacked as the thirds [q; k; v] of our c_attn.
#   "heads"      NeoX's fused qkv rows are per head [h0 q, h0 k, h0 v, h1 q, ...]: regroup to [q; k; v].
# Rows whose target our model lacks (biases a config turns off) are not expected in the file.

CHECKPOINT_NAMES = {
    "gpt2": [
        ("transformer.wte.weight", "transformer.wte.weight", None),
        ("transformer.wpe.weight", "transformer.wpe.weight", None),
        ("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", None),
        ("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", None),
        ("transformer.h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", "T"),
        ("transformer.h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", None),
        ("transformer.h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", "T"),
        ("transformer.h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", None),
        ("transformer.h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", None),
        ("transformer.h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", None),
        ("transformer.h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", "T"),
        ("transformer.h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", None),
        ("transformer.h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", "T"),
        ("transformer.h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", None),
        ("transformer.ln_f.weight", "transformer.ln_f.weight", None),
        ("transformer.ln_f.bias", "transformer.ln_f.bias", None),
        ("lm_head.weight", "lm_head.weight", None),
    ],
    "gptj": [
        ("transformer.wte.weight", "transformer.wte.weight", None),
        ("transformer.h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", None),
        ("transformer.h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", None),
        ("transformer.h.{i}.attn.q_proj.weight", "transformer.h.{i}.attn.c_attn.weight", "q"),
        ("transformer.h.{i}.attn.k_proj.weight", "transformer.h.{i}.attn.c_attn.weight", "k"),
        ("transformer.h.{i}.attn.v_proj.weight", "transformer.h.{i}.attn.c_attn.weight", "v"),
        ("transformer.h.{i}.attn.out_proj.weight", "transformer.h.{i}.attn.c_proj.weight", None),
        ("transformer.h.{i}.mlp.fc_in.weight", "transformer.h.{i}.mlp.c_fc.weight", None),
        ("transformer.h.{i}.mlp.fc_in.bias", "transformer.h.{i}.mlp.c_fc.bias", None),
        ("transformer.h.{i}.mlp.fc_out.weight", "transformer.h.{i}.mlp.c_proj.weight", None),
        ("transformer.h.{i}.mlp.fc_out.bias", "transformer.h.{i}.mlp.c_proj.bias", None),
        ("transformer.ln_f.weight", "transformer.ln_f.weight", None),
        ("transformer.ln_f.bias", "transformer.ln_f.bias", None),
        ("lm_head.weight", "lm_head.weight", None),
        ("lm_head.bias", "lm_head.bias", None),
    ],
    "gpt_neox": [
        ("gpt_neox.embed_in.weight", "transformer.wte.weight", None),
        ("gpt_neox.layers.{i}.input_layernorm.weight", "transformer.h.{i}.ln_1.weight", None),
        ("gpt_neox.layers.{i}.input_layernorm.bias", "transformer.h.{i}.ln_1.bias", None),
        ("gpt_neox.layers.{i}.attention.query_key_value.weight", "transformer.h.{i}.attn.c_attn.weight", "heads"),
        ("gpt_neox.layers.{i}.attention.query_key_value.bias", "transformer.h.{i}.attn.c_attn.bias", "heads"),
        ("gpt_neox.layers.{i}.attention.dense.weight", "transformer.h.{i}.attn.c_proj.weight", None),
        ("gpt_neox.layers.{i}.attention.dense.bias", "transformer.h.{i}.attn.c_proj.bias", None),
        ("gpt_neox.layers.{i}.post_attention_layernorm.weight", "transformer.h.{i}.ln_2.weight", None),
        ("gpt_neox.layers.{i}.post_attention_layernorm.bias", "transformer.h.{i}.ln_2.bias", None),
        ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", "transformer.h.{i}.mlp.c_fc.weight", None),
        ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", "transformer.h.{i}.mlp.c_fc.bias", None),
        ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", "transformer.h.{i}.mlp.c_proj.weight", None),
        ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", "transformer.h.{i}.mlp.c_proj.bias", None),
        ("gpt_neox.final_layer_norm.weight", "transformer.ln_f.weight", None),
        ("gpt_neox.final_layer_norm.bias", "transformer.ln_f.bias", None),
        ("embed_out.weight", "lm_head.weight", None),
    ],
}

# Buffers some checkpoints carry that are not weights (causal masks, rotary frequencies): dropped.
IGNORED_SUFFIXES = {
    "gpt2": (".attn.bias", ".attn.masked_bias"),
    "gptj": (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq"),
    "gpt_neox": (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
}


def read_json(path):
    """A JSON file holding one object (config.json, an index); a missing or malformed file is one error
    naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(content).__name__}")
    return content


def config_from_hf(path):
    """GPTConfig from a Hugging Face directory's config.json (model_type picks the family)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory not found: {path}" if not os.path.exists(path) else
                                f"{path} is not a directory; expected a Hugging Face model directory "
                                f"(config.json + weights)")
    hf = read_json(os.path.join(path, "config.json"))
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"{os.path.join(path, 'config.json')}: unknown model_type {family!r}; "
                         f"supported: {sorted(FAMILIES)}")
    get = hf.get  # missing keys take transformers' defaults for the family, as save_pretrained may omit them
    if family in ("gpt2", "gptj"):
        config = dict(vocab_size=get("vocab_size", 50257 if family == "gpt2" else 50400),
                      block_size=get("n_positions", 1024 if family == "gpt2" else 2048),
                      n_layer=get("n_layer", 12 if family == "gpt2" else 28),
                      n_head=get("n_head", 12 if family == "gpt2" else 16),
                      n_embd=get("n_embd", 768 if family == "gpt2" else 4096),
                      n_inner=get("n_inner"),
                      activation=get("activation_function", "gelu_new"),
                      layer_norm_eps=get("layer_norm_epsilon", 1e-5),
                      tie_word_embeddings=get("tie_word_embeddings", family == "gpt2"))
        if family == "gpt2":
            config.update(scale_attn_weights=get("scale_attn_weights", True),
                          scale_attn_by_inverse_layer_idx=get("scale_attn_by_inverse_layer_idx", False))
        else:
            config.update(rotary_dim=get("rotary_dim", 64))
    else:
        # transformers >= 5 writes rope_parameters; older files (the Pythia hub) rotary_pct/rotary_emb_base.
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{path}: rotary scaling {rope} is not supported (only plain rotary)")
        hidden, heads = get("hidden_size", 6144), get("num_attention_heads", 64)
        pct = rope.get("partial_rotary_factor", get("rotary_pct", 0.25))
        config = dict(vocab_size=get("vocab_size", 50432),
                      block_size=get("max_position_embeddings", 2048),
                      n_layer=get("num_hidden_layers", 44), n_head=heads, n_embd=hidden,
                      n_inner=get("intermediate_size", 4 * hidden),
                      activation=get("hidden_act", "gelu"),
                      layer_norm_eps=get("layer_norm_eps", 1e-5),
                      rotary_dim=int((hidden // heads) * pct),
                      rotary_base=float(rope.get("rope_theta", get("rotary_emb_base", 10000.0))),
                      parallel_residual=get("use_parallel_residual", True),
                      attn_bias=get("attention_bias", True),
                      tie_word_embeddings=get("tie_word_embeddings", False))
    try:
        return GPTConfig(model_type=family, **config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: {e}") from None


def read_hf_weights(path):
    """All tensors of a Hugging Face directory as (tensors, {name: file it came from}, weights file).

    The weights file, named in errors about the checkpoint as a whole, is the single file or the
    index of a sharded checkpoint. Looks for, in order: model.safetensors.index.json (sharded),
    model.safetensors, pytorch_model.bin.index.json (sharded), pytorch_model.bin.
    """
    for index_name, single_name in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(path, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: no 'weight_map' object")
            state, origin = {}, {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(path, shard)
                tensors = read_checkpoint_file(shard_path)
                for name in tensors:
                    origin[name] = shard_path
                state.update(tensors)
            for name, shard in weight_map.items():
                if name not in state:
                    raise ValueError(f"{index_path}: tensor {name!r} listed in shard {shard} is not in it")
            return state, origin, index_path
        single = os.path.join(path, single_name)
        if os.path.isfile(single):
            state = read_checkpoint_file(single)
            return state, {name: single for name in state}, single
    raise FileNotFoundError(f"{path}: no weights found (model.safetensors, model.safetensors.index.json, "
                            f"pytorch_model.bin or pytorch_model.bin.index.json)")


def convert_checkpoint(state, origin, config, source):
    """Rename and convert a checkpoint's tensors to our names, checking every one of them.

    Raises ValueError naming the tensor and its file (origin[name], else `source`) for anything
    missing, unexpected or mis-shaped.
    """
    family = config.model_type
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES[family])}
    if family == "gpt2" and not any(k.startswith("transformer.") for k in state):
        # The hub's original gpt2 file names tensors without the "transformer." prefix.
        state = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in state.items()}
        origin = {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in origin.items()}
    with torch.device("meta"):
        own = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    expected = {}  # checkpoint name -> (our name, conversion)
    for ckpt, ours, how in CHECKPOINT_NAMES[family]:
        for i in range(config.n_layer) if "{i}" in ckpt else [None]:
            c, o = ckpt.format(i=i), ours.format(i=i)
            if o in own:
                expected[c] = (o, how)
    tied = config.tie_word_embeddings  # then the head is the embedding; a stored copy is optional
    optional = {c for c, (o, _) in expected.items() if tied and o.startswith("lm_head.")}
    where = lambda name: origin.get(name, source)
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{where(unexpected[0])}: unexpected tensor(s) {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} for a {family} model")
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"for a {family} model")
    out, parts = {}, {}
    for name, (ours, how) in expected.items():
        if name not in state:
            continue
        tensor, want = state[name], own[ours]
        if how == "T":
            want = want[::-1]
        elif how in ("q", "k", "v"):
            want = (want[0] // 3,) + want[1:]
        if tuple(tensor.shape) != want:
            raise ValueError(f"{where(name)}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {want} for this config")
        if name in optional:
            continue
        if how == "T":
            tensor = tensor.t()
        elif how == "heads":
            H = config.n_head  # rows (H, 3, D) -> (3, H, D), i.e. [q; k; v], each head's D rows in order
            tensor = tensor.reshape(H, 3, -1, *tensor.shape[1:]).transpose(0, 1).reshape(tensor.shape)
        if how in ("q", "k", "v"):
            parts.setdefault(ours, {})[how] = tensor
        else:
            out[ours] = tensor
    for ours, p in parts.items():
        out[ours] = torch.cat([p["q"], p["k"], p["v"]], dim=0)
    if tied:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


# ----------------------------------------------------------------------------------------------------
# Command line: the sanity check to run on a downloaded checkpoint.

def _load_tokenizer(path):
    """tokenizer.Tokenizer for the directory, or None when it has no GPT-2 vocabulary files."""
    has = lambda *names: all(os.path.isfile(os.path.join(path, n)) for n in names)
    if not (has("vocab.json", "merges.txt") or has("encoder.json", "vocab.bpe")):
        return None
    from tokenizer import Tokenizer
    return Tokenizer.from_pretrained(path)


def main(argv=None):
    """Entry point of `python gpt.py PATH --prompt "..." [--compare]`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gpt.py",  # also when main() is called from a test
                                     description="Load a GPT-2 / GPT-J / GPT-NeoX Hugging Face directory, "
                                     "print what it is and a greedy continuation.")
    parser.add_argument("path", help="model directory (config.json + model.safetensors or pytorch_model.bin)")
    parser.add_argument("--prompt", help="text to continue (needs vocab.json+merges.txt or encoder.json+vocab.bpe)")
    parser.add_argument("--ids", help="token ids to continue, e.g. '464 3290' (for directories without a tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate greedily (default 20)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16", "float32", "float16", "bfloat16"],
                        help="parameter dtype, as magma.py spells it or as torch does (default: as stored)")
    parser.add_argument("--compare", action="store_true",
                        help="also run transformers' AutoModelForCausalLM and print the max abs logit difference")
    args = parser.parse_args(argv)
    if not os.path.exists(args.path):  # a wrong path first: fixing the flags would not help
        print(f"gpt.py: error: model directory not found: {args.path}", file=sys.stderr)
        return 1
    if (args.prompt is None) == (args.ids is None):
        parser.error("give exactly one of --prompt and --ids")
    if args.max_new_tokens < 0:
        parser.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.compare and importlib.util.find_spec("transformers") is None:
        parser.error("--compare needs the transformers package (pip install transformers)")
    try:
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(args.dtype, args.dtype)
        model = GPT.from_pretrained(args.path, dtype=getattr(torch, dtype) if dtype else None)
        tok = _load_tokenizer(args.path)
        if args.prompt is not None:
            if tok is None:
                raise ValueError(f"{args.path} has no tokenizer files (vocab.json+merges.txt or "
                                 f"encoder.json+vocab.bpe); pass token ids with --ids")
            ids = tok.encode(args.prompt)
        else:
            try:
                ids = [int(s) for s in args.ids.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"--ids must be integers, got {args.ids!r}") from None
        if not ids or not all(0 <= i < model.config.vocab_size for i in ids):
            raise ValueError(f"prompt ids must be a non-empty list in 0..{model.config.vocab_size - 1}, got {ids}")
        if model.config.rotary is None and len(ids) + args.max_new_tokens > model.config.block_size:
            raise ValueError(f"{len(ids)} prompt tokens + --max-new-tokens {args.max_new_tokens} exceed this "
                             f"model's {model.config.block_size} learned positions")
    except (OSError, ValueError) as e:
        print(f"gpt.py: error: {e}", file=sys.stderr)
        return 1
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(f"family: {c.model_type}  layers: {c.n_layer}  heads: {c.n_head}  width: {c.n_embd}  vocab: {c.vocab_size}")
    print(f"parameters: {n_params:,}  dtype: {model.transformer.wte.weight.dtype}")
    idx = torch.tensor([ids])
    out = model.generate(idx, args.max_new_tokens, temperature=0)[0, len(ids):].tolist()
    print(f"prompt ids: {ids}")
    print(f"greedy ids: {out}")
    if tok is not None:
        print(f"greedy text: {tok.decode(ids)}{tok.decode(out)}")
    if args.compare:
        import transformers  # the reference, only behind --compare
        transformers.utils.logging.disable_progress_bar()
        dtype = model.transformer.wte.weight.dtype
        ref = transformers.AutoModelForCausalLM.from_pretrained(args.path, dtype=dtype, attn_implementation="eager").eval()
        full = torch.tensor([ids + out])
        with torch.no_grad():
            diff = (model(full).float() - ref(full).logits.float()).abs().max().item()
        print(f"max abs logit difference vs transformers ({dtype}, {full.shape[1]} tokens): {diff:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
