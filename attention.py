"""Attention: the one function every transformer block in this codebase calls.

    attention(q, k, v, causal=False, key_padding_mask=None, scale=None)

q is (B, H, Tq, D), k and v are (B, H, Tk, D); the result is (B, H, Tq, D).

Semantics (shared/DESIGN.md):
- `causal` aligns bottom-right: query i may see key j when j <= i + (Tk - Tq). With a KV cache the
  Tq new queries are the last Tq positions of the Tk keys, so this is the ordinary causal mask.
- `key_padding_mask` is (B, Tk) bool, True = keep (left-padded batches mark their pads False).
- A query row that sees no key at all returns zeros, never NaN.

Implementations:
- `attention_reference`: the plain PyTorch definition, softmax(q k^T * scale) v. It materialises the
  (Tq, Tk) score matrix, which is what the fused kernel avoids.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention with an explicit boolean mask, with the
  fully-masked rows zeroed afterwards (SDPA itself would return NaN or an average there).
- `attention` dispatches between them; `impl=` or the environment variable MAGMA_ATTENTION
  (`reference`, `sdpa`) forces one.
"""
import math
import os

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("auto", "reference", "sdpa")


def visible_mask(Tq, Tk, causal, key_padding_mask, device):
    """The boolean (B or 1, 1, Tq, Tk) mask of which keys each query may see, or None if all."""
    mask = None
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Tk)
        mask = pad if mask is None else (mask & pad)
    return mask


def _check(q, k, v, key_padding_mask):
    assert q.dim() == 4 and k.dim() == 4 and v.dim() == 4, "q, k, v must be (B, H, T, D)"
    B, H, Tq, D = q.shape
    assert k.shape[:2] == (B, H) and k.shape[3] == D, f"k {tuple(k.shape)} does not match q {tuple(q.shape)}"
    assert v.shape == k.shape, f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}"
    if key_padding_mask is not None:
        assert key_padding_mask.shape == (B, k.shape[2]), (
            f"key_padding_mask {tuple(key_padding_mask.shape)} must be (B, Tk) = {(B, k.shape[2])}")


def attention_reference(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """softmax(q k^T * scale) v, computed in float32 and returned in q's dtype."""
    _check(q, k, v, key_padding_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    mask = visible_mask(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if mask is not None:
        att = att.masked_fill(~mask, 0.0)  # rows with no visible key: softmax gave NaN, we want 0
    return (att @ v.float()).to(q.dtype)  # (B, H, Tq, D)


def sdpa(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """PyTorch's scaled_dot_product_attention with our masking semantics."""
    _check(q, k, v, key_padding_mask)
    Tq, Tk = q.shape[2], k.shape[2]
    if key_padding_mask is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = visible_mask(Tq, Tk, causal, key_padding_mask, q.device)  # (B|1, 1, Tq, Tk)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~mask.any(-1, keepdim=True), 0.0)


def attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl=None):
    """Scaled dot-product attention with the semantics above; `impl` forces an implementation."""
    impl = impl or os.environ.get("MAGMA_ATTENTION", "auto")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {IMPLEMENTATIONS}")
    if impl == "reference":
        return attention_reference(q, k, v, causal, key_padding_mask, scale)
    return sdpa(q, k, v, causal, key_padding_mask, scale)
