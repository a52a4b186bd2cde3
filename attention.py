"""Attention: the one function every transformer block in this codebase calls.

    attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl=None)

q is (B, H, Tq, D), k and v are (B, H, Tk, D); the result is (B, H, Tq, D).

Semantics (shared/DESIGN.md):
- `causal` aligns bottom-right: query i may see key j when j <= i + (Tk - Tq). With a KV cache the
  Tq new queries are the last Tq positions of the Tk keys, so this is the ordinary causal mask.
- `key_padding_mask` is (B, Tk) bool, True = keep (left-padded batches mark their pads False).
- A query row that sees no key at all returns zeros (and gets zero gradient), never NaN.

Implementations:
- `attention_reference`: the plain PyTorch definition, softmax(q k^T * scale) v. It materialises the
  (Tq, Tk) score matrix, which is what the fused kernel avoids.
- `sdpa`: torch.nn.functional.scaled_dot_product_attention with an explicit boolean mask, with the
  fully-masked rows zeroed afterwards (SDPA itself would return NaN or an average there).
- `flash_attention`: our FlashAttention-style Triton kernel, forward and backward (below). Its
  backward is two kernels (dK/dV, then dQ; the default) or one ("One-kernel backward" below):
  MAGMA_FLASH_BACKWARD, read when the forward runs, is `split`, `fused`, or `auto` (the one timed
  faster for each shape class, on a GPU with autotuning on, for 16-bit inputs that want dQ).
- `attention` dispatches between them: `impl=` (which wins) or else the environment variable
  MAGMA_ATTENTION (`auto`, `reference`, `sdpa`, `triton`) picks one. `auto` = the Triton kernel for
  CUDA tensors it accepts when Triton imports (`_flash_supported`: fp16/bf16/fp32 alike, head dim up
  to 256, scale > 0), SDPA otherwise.

------------------------------------------------------------------------------------------------
How the fused kernel works (FlashAttention, Dao et al. 2022; FlashAttention-2, Dao 2023)
------------------------------------------------------------------------------------------------
Per (batch, head) the attention is  S = Q K^T * scale  (Tq, Tk),  P = softmax(S) row-wise,  O = P V.
Materialising S costs Tq*Tk memory traffic: for T = 8192 that is 64M floats per head. The kernel
never writes S: one program owns BLOCK_M query rows, keeps them in registers, and streams the keys
and values past them BLOCK_N at a time.

Online softmax. For one query row, walking over key blocks j = 1, 2, ... keep three running values:
    m_j = max(m_{j-1}, max_k s_k)                           running maximum of the scores seen
    l_j = l_{j-1} * exp(m_{j-1} - m_j) + sum_k exp(s_k - m_j)   running softmax denominator
    o_j = o_{j-1} * exp(m_{j-1} - m_j) + sum_k exp(s_k - m_j) v_k   running unnormalised output
The factor exp(m_{j-1} - m_j) rescales what was accumulated against the old maximum to the new
one, so after the last block O = o / l exactly (no approximation), and every exp() has a
non-positive argument, so nothing overflows. The kernel works in base 2 (exp2 is one hardware
instruction): the scores are scaled by scale * log2(e) and every exp() is an exp2().

Why the log-sum-exp is saved. At the end, lse = m + log(l) is the log of the softmax denominator,
so P = exp(S - lse) for the whole row. Saving this one float per row (fp32, (B, H, Tq); base 2
here) lets the backward recompute any block of P from Q and K alone, without redoing the online
recurrence and without ever storing P (Tq*Tk) for the backward.

What the backward recomputes, per block (dO is the incoming gradient of O):
    P  = exp(S - lse)                  recomputed from Q, K and the saved lse
    dV = P^T dO                        (summed over query blocks)
    dP = dO V^T
    dS = P * (dP - delta)              the softmax backward, with delta = rowsum(P * dP)
    dQ = dS K * scale                  (summed over key blocks)
    dK = dS^T Q * scale                (summed over query blocks)
delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i, because O_i = sum_j P_ij V_j: so
delta = rowsum(dO * O) needs neither P nor dP, and a small pre-pass computes it once. Then two
kernels: one program per key block loops over the query blocks and accumulates dK and dV in
registers; one program per query block loops over the key blocks and accumulates dQ. Each output
block has exactly one owner, so there are no atomic additions and the result is bitwise
deterministic for a given launch config (FlashAttention-2's single kernel with atomic dQ updates is
faster on some shapes but not reproducible). The price: both kernels need S (hence P) and dP, so
each computes them itself, seven matmuls in all where the algorithm needs five (see FLOPs below).
One-kernel backward (16-bit inputs on a GPU; MAGMA_FLASH_BACKWARD=fused). One program
per (batch, head) walks its key blocks one after another; for each it loops over the query blocks
that see it, accumulating dK and dV in registers as above, and adds the block's share of dQ (dS K)
into an fp32 buffer by atomic additions. One program makes every addition to its rows of that
buffer, in key-block order (a barrier between key blocks), so the sum is still deterministic. S and
dP are computed once, five matmuls instead of seven, in one launch instead of two. The price is
parallelism, B*H programs: it is meant for many heads of short sequences (a ViT's 64 x 12 heads of
197 tokens), where each program of the two-kernel backward sees only a few blocks. `bench.py
attention` times it (`triton-fusedbwd`); the autotuner zeroes the buffer before each timed run.
Which backward is faster is a matter of measurement, as a launch config is. On the H200 (first
configs) the two-kernel backward's time fit ~40 us per program plus ~0.8 us per step of its loop,
shared over the 132 SMs (fitted on ViT-B/16 and long; GPT-2, GPT-J and ViT-L/14@336 within 9%;
bench.py's sixth shape, head dim 256, with far smaller tiles, takes 27% longer): it is slow where
it launches many programs that each take few steps (ViT-B/16: 3,072 programs of 4 steps), and there
the one-kernel backward launches 4x fewer; on long sequences the one-kernel backward has too few
programs to fill the GPU (B*H = 32 at bench.py's). MAGMA_FLASH_BACKWARD=auto times both at the first
backward of each shape class (the autotuner's key: lengths and batch*heads bucketed, the head dim, the
masks, the dtype; and the device) with triton.testing.do_bench, as the autotuner times configs, and
keeps the faster. It runs the two-kernel backward without a GPU, with MAGMA_FLASH_AUTOTUNE=0, for
fp32 inputs and without dQ, and, for a class not yet timed, while a CUDA graph is being captured.
The one-kernel backward has run only on the CPU (the interpreter) so far, so the default stays the
two-kernel one, which the GPU tests have checked on an H200.
The autotuner picks configs by timing, which can differ between runs: MAGMA_FLASH_AUTOTUNE=0 pins
the first config of each list for runs that must repeat. Accumulation is fp32 throughout.

Masks. Key blocks entirely above the causal diagonal are skipped (the loop bounds stop there); key
blocks entirely below it run without any causal mask arithmetic; only the few blocks that cross the
diagonal or the ragged end of the sequence (197 ViT tokens is not a multiple of 64) pay for that
mask. (A key padding mask, when given, is applied to every key block by the forward and dQ kernels.)
A row that sees no key ends with l = 0: it stores O = 0 and lse = +inf, so the backward's
P = exp(S - inf) = 0 and its gradients are exactly 0 even before any mask is applied (lse = -inf
would give P = exp(+inf) = inf, and inf * 0 = NaN wherever a mask does not catch it).

Decoding (Tq = 1 against a long cache): one query row cannot fill a 128-row block, and B*H programs
are too few to keep an H100's 132 SMs busy. The decode path ("flash-decoding") splits the keys into
chunks handled by separate programs, each producing a partial (o_s, lse_s); a second tiny kernel
merges them: lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) o_s. Each program runs the
forward's own loop over its keys, with the query as row 0 of a 16-row tile (the smallest a dot
takes): decoding reads K and V once and does almost no arithmetic, so what counts is keeping loads in
flight, which the forward's software-pipelined loop does. (A first version computed the scores as a
multiply and a row sum, with no pipelining: on an H200 it read the cache at 1.3 TB/s, 2.5x slower
than the 128-row forward kernel on the same call.)

FLOPs (used by bench.py): the forward does two matmuls of 2*Tq*Tk*D each: 4*B*H*Tq*Tk*D in all,
half that with a causal mask (Tq = Tk). The backward's algorithm needs five (S again, dV, dP, dQ,
dK): 2.5x the forward, the count FlashAttention's papers report and bench.py credits every
implementation with. This kernel's backward runs seven (S and dP in both of its kernels, the price
of having no atomics): its hardware FLOP rate is 7/5 = 1.4x the credited one in the backward, and
(2 + 7)/(2 + 5) = 1.29x in bench.py's forward+backward rows.

Precision: fp16 and bf16 inputs use tensor-core dots with fp32 accumulation; fp32 inputs use exact
fp32 dots ("ieee") unless torch.set_float32_matmul_precision allows TF32, as for torch matmuls.
Inputs may have any strides (e.g. q = x.view(B, T, H, D).transpose(1, 2)): every kernel takes the
four strides of each tensor. Head dims up to 256, each with its own launch configurations; a head
dim that is not a power of two >= 16 is padded up to one (BLOCK_D, what the kernels' "D" in shape
comments means) and masked on load and store.

Reading order: the reference and SDPA, then the Triton kernels (forward, backward, then the decode
path), their launch configurations, the host-side launchers with their autograd wiring, and last
the dispatcher.
"""
import contextlib
import functools
import math
import os
import types
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR = None
except ImportError as e:  # CPU-only install: the kernels below stay plain, never-launched functions
    TRITON_IMPORT_ERROR = e
    triton = types.SimpleNamespace(jit=lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    tl = types.SimpleNamespace(constexpr=None)

IMPLEMENTATIONS = ("auto", "reference", "sdpa", "triton")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # Triton runs kernels on CPU tensors
LOG2E = 1.4426950408889634  # log2(e): the kernels work in base 2, exp(x) = exp2(x * LOG2E)


# ------------------------------------------------------------------------------------------------
# The reference and SDPA paths
# ------------------------------------------------------------------------------------------------

def visible_mask(Tq, Tk, causal, key_padding_mask, device):
    """The boolean (B or 1, 1, Tq, Tk) mask of which keys each query may see, or None if all."""
    mask = None
    if causal:
        i = torch.arange(Tq, device=device)[:, None]
        j = torch.arange(Tk, device=device)[None, :]
        mask = (j <= i + (Tk - Tq))[None, None]  # (1, 1, Tq, Tk)
    if key_padding_mask is not None:
        pad = key_padding_mask[:, None, None, :].to(device=device, dtype=torch.bool)  # (B, 1, 1, Tk)
        mask = pad if mask is None else (mask & pad)
    return mask


def _check(q, k, v, key_padding_mask):
    """Raise a ValueError naming the tensor whose shape does not fit q (B, H, Tq, D)."""
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        raise ValueError(f"q, k, v must be (B, H, T, D); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v {tuple(v.shape)} must have the shape of k {tuple(k.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"key_padding_mask {tuple(key_padding_mask.shape)} must be (B, Tk) = "
                         f"{(B, k.shape[2])}")


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


# ------------------------------------------------------------------------------------------------
# Triton kernels. The forward and backward kernels run one program per (block of rows, batch*head):
# program_id(1) is b * H + h (the decode kernels below say how they differ). Scores are kept in base
# 2: s2 = (q . k) * scale * log2(e), so p = exp2(s2 - lse2) and lse2 = lse * log2(e).
# ------------------------------------------------------------------------------------------------

# Triton compiles a kernel anew for each pattern of its integer arguments (== 1, divisible by 16).
# For lengths and head counts that buys nothing here (masks handle ragged ends) and costs a compile of
# every config for every new shape (197 vs 1024 tokens, 12 vs 16 heads): these are not specialized.
SHAPE_ARGS = ["stride_kpm", "H", "Tq", "Tk", "TQ_BUCKET", "TK_BUCKET", "BH_BUCKET"]


@triton.jit
def _load_rows(base, rows, offs_d, stride_r, stride_d, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows and the head-dim padding read as 0."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, x, rows, offs_d, stride_r, stride_d, n_rows,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store a (len(rows), BLOCK_D) tile, skipping rows >= n_rows and the head-dim padding."""
    ptrs = base + rows[:, None] * stride_r + offs_d[None, :] * stride_d
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
               stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK: tl.constexpr,
               PRECISION: tl.constexpr):
    """One step of the online softmax: fold keys [start_n, start_n + BLOCK_N) into (acc, l, m)."""
    cols = start_n + tl.arange(0, BLOCK_N)                                # (BLOCK_N,) key indices
    k = _load_rows(k_base, cols, offs_d, stride_kn, stride_kd, Tk, HEAD_DIM, BLOCK_D)  # (BLOCK_N, D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)                 # (BLOCK_M, BLOCK_N) q.k
    if MASK:  # only blocks on the causal diagonal or past the end of the keys
        keep = cols[None, :] < Tk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
        s = tl.where(keep, s, float("-inf"))
    if HAS_KPM:
        pad = tl.load(kpm_base + cols, mask=cols < Tk, other=0)          # (BLOCK_N,) 1 = keep
        s = tl.where(pad[None, :] != 0, s, float("-inf"))
    # qk_scale > 0, so the scaled row maximum is the maximum of the unscaled scores, scaled: the scale
    # is applied once per row here and inside exp2's argument below, one fused multiply-add per score
    # instead of a multiply and a subtract. Scalar work per score counts: at D = 64 the two matmuls
    # cost 4*D = 256 FLOPs per score, 1/16 of a clock of an H100 SM's tensor cores (~4096 FLOPs per
    # clock); in that 1/16 clock its 128 FP32 lanes do 8 scalar operations per score, no more.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                      # (BLOCK_M,) base-2 max
    # A row that has seen only masked keys has m = -inf; subtracting 0 instead keeps exp2(-inf) = 0
    # where exp2(-inf - (-inf)) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])                      # (BLOCK_M, BLOCK_N)
    alpha = tl.math.exp2(m_i - m_safe)                                    # rescales the old sums
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_base, cols, offs_d, stride_vn, stride_vd, Tk, HEAD_DIM, BLOCK_D)  # (BLOCK_N, D)
    acc = tl.dot(p.to(v.dtype), v, acc=acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _fwd_kernel(Q, K, V, O, LSE, KPM,
                stride_qb, stride_qh, stride_qm, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_om, stride_od,
                stride_kpm, H, Tq, Tk, qk_scale, TQ_BUCKET, TK_BUCKET, BH_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """O and lse2 for BLOCK_M query rows of one (batch, head). The *_BUCKETs only key the autotuner."""
    # With a causal mask the last query blocks see the most keys: launch them first so that the
    # long programs do not end up as a tail on a few SMs.
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_kpm

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                      # (BLOCK_M,) query rows
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, Tq, HEAD_DIM, BLOCK_D)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)             # running max
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                           # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                  # running numerator

    # Key range of this query block: [0, full) needs no mask, [full, hi) does, >= hi is invisible.
    # Row i sees keys j <= i + (Tk - Tq): the block's last row sets hi (exclusive), its first row sets
    # full (the keys every row of the block sees), rounded down to whole key blocks.
    if CAUSAL:
        hi = tl.minimum(tl.maximum(pid_m * BLOCK_M + BLOCK_M + (Tk - Tq), 0), Tk)
        full = tl.minimum(tl.maximum(pid_m * BLOCK_M + (Tk - Tq) + 1, 0), Tk)
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, False, PRECISION)
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, True, PRECISION)

    # Rows that saw no key have l = 0 and acc = 0: output 0, lse2 = +inf (so the backward's P = 0).
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = O + b * stride_ob + h * stride_oh
    _store_rows(o_base, o, offs_m, offs_d, stride_om, stride_od, Tq, HEAD_DIM, BLOCK_D)
    tl.store(LSE + pid_bh * Tq + offs_m, lse2, mask=offs_m < Tq)


@triton.jit(do_not_specialize=["H", "Tq"])
def _bwd_delta_kernel(O, DO, DELTA,
                      stride_ob, stride_oh, stride_om, stride_od,
                      stride_dob, stride_doh, stride_dom, stride_dod,
                      H, Tq, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Backward pre-pass: delta = rowsum(dO * O) in fp32, (B, H, Tq)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od, Tq,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Tq,
                    HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                 # (BLOCK_M,)
    tl.store(DELTA + pid_bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit
def _bwd_dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_n, offs_d,
                    stride_qm, stride_qd, stride_dom, stride_dod, Tq, Tk, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    CAUSAL: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr,
                    FUSED: tl.constexpr = False, keep=None, dq_base=None):
    """Add the contribution of queries [start_m, start_m + BLOCK_M) to this key block's dK, dV.
    FUSED (the one-kernel backward): also add this key block's share of their dQ into dq_base."""
    rows = start_m + tl.arange(0, BLOCK_M)                                   # (BLOCK_M,) queries
    q = _load_rows(q_base, rows, offs_d, stride_qm, stride_qd, Tq, HEAD_DIM, BLOCK_D)    # (BLOCK_M, D)
    do = _load_rows(do_base, rows, offs_d, stride_dom, stride_dod, Tq, HEAD_DIM, BLOCK_D)
    # Query rows past Tq load q = dO = 0, delta = 0 and lse = +inf, so they add exactly 0.
    lse2 = tl.load(lse_base + rows, mask=rows < Tq, other=float("inf"))     # (BLOCK_M,)
    delta = tl.load(delta_base + rows, mask=rows < Tq, other=0.0)
    # Work with transposed scores (keys x queries) so dK and dV come out as (BLOCK_N, D).
    sT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale       # (BLOCK_N, BLOCK_M)
    pT = tl.math.exp2(sT - lse2[None, :])                                    # P^T
    if MASK:
        if CAUSAL:
            pT = tl.where(offs_n[:, None] <= rows[None, :] + (Tk - Tq), pT, 0.0)
    if FUSED:  # keys past Tk and padded keys must not reach dQ (see below)
        pT = tl.where(keep[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PRECISION)            # dV += P^T dO
    dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)                # dP^T = V dO^T
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)                          # dS^T
    dk += tl.dot(dsT, q, input_precision=PRECISION)                         # dK += dS^T Q
    # No mask for keys past Tk (loaded as k = v = 0): each key's row of dK and dV depends on that key
    # alone, so those rows may hold anything (even inf or NaN) and _store_rows never writes them.
    # dQ must mask them: there every key's column is summed into each row of dQ (for a key past Tk
    # s = 0, and exp2(-lse2) may overflow: inf * 0 is NaN).
    if FUSED:
        dq = tl.dot(tl.trans(dsT), k, input_precision=PRECISION)            # (BLOCK_M, D): dS K
        ptrs = dq_base + rows[:, None] * BLOCK_D + offs_d[None, :]
        tl.atomic_add(ptrs, dq, mask=rows[:, None] < Tq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_key_block(q_base, k_base, v_base, do_base, lse_base, delta_base, kpm_base, dk_base, dv_base, start_n,
                   stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_dom, stride_dod,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd, Tq, Tk, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KPM: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, FUSED: tl.constexpr = False, dq_base=None):
    """dK and dV of keys [start_n, start_n + BLOCK_N) of one (batch, head), looping over the query
    blocks that see them (FUSED: and their share of dQ, added into dq_base)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)                                # (BLOCK_N,) keys
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, Tk, HEAD_DIM, BLOCK_D)  # (BLOCK_N, D)
    v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, Tk, HEAD_DIM, BLOCK_D)
    keep = None
    if FUSED:  # the keys that may reach dQ: real (< Tk) and not padding
        keep = offs_n < Tk
        if HAS_KPM:
            keep = keep & (tl.load(kpm_base + offs_n, mask=keep, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query range that sees this key block: [lo, full) crosses the diagonal (masked), [full, Tq)
    # sees every key of the block; queries before lo see none of it and are skipped. Key j is seen by
    # rows i >= j - (Tk - Tq): the block's first key sets lo, its last key sets full (both rounded
    # to whole query blocks, lo down and full up).
    if CAUSAL:
        lo = (tl.maximum(start_n - (Tk - Tq), 0) // BLOCK_M) * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M) * BLOCK_M
        masked_end = tl.minimum(full, Tq)
    else:
        lo = 0
        full = 0
        masked_end = 0
    for start_m in range(lo, masked_end, BLOCK_M):
        dk, dv = _bwd_dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_n,
                                 offs_d, stride_qm, stride_qd, stride_dom, stride_dod, Tq, Tk, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, True, PRECISION, FUSED, keep, dq_base)
    for start_m in range(full, Tq, BLOCK_M):
        dk, dv = _bwd_dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, offs_n,
                                 offs_d, stride_qm, stride_qd, stride_dom, stride_dod, Tq, Tk, qk_scale,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, CAUSAL, False, PRECISION, FUSED, keep, dq_base)
    # Every key column is independent here: a padded key's column of P was never zeroed above,
    # but its whole dK, dV row is simply 0, so zero it at the end instead of masking every step.
    # (FUSED masked it already, for dQ's sake.)
    if HAS_KPM and not FUSED:
        keep = tl.load(kpm_base + offs_n, mask=offs_n < Tk, other=0) != 0
        dk = tl.where(keep[:, None], dk, 0.0)
        dv = tl.where(keep[:, None], dv, 0.0)
    # P is exp2(s2 - lse2) in base 2, but dS is the gradient with respect to the natural-log scores
    # S = scale * Q K^T, so the chain rule brings in sm_scale (not qk_scale = sm_scale * log2(e)).
    dk = dk * sm_scale
    _store_rows(dk_base, dk, offs_n, offs_d, stride_dkn, stride_dkd, Tk, HEAD_DIM, BLOCK_D)
    _store_rows(dv_base, dv, offs_n, offs_d, stride_dvn, stride_dvd, Tk, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KPM, DK, DV,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_dom, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     stride_kpm, H, Tq, Tk, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET, BH_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV for BLOCK_N keys of one (batch, head), looping over the query blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    _bwd_key_block(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
                   V + b * stride_vb + h * stride_vh, DO + b * stride_dob + h * stride_doh,
                   LSE + pid_bh * Tq, DELTA + pid_bh * Tq, KPM + b * stride_kpm,
                   DK + b * stride_dkb + h * stride_dkh, DV + b * stride_dvb + h * stride_dvh, pid_n * BLOCK_N,
                   stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_dom, stride_dod,
                   stride_dkn, stride_dkd, stride_dvn, stride_dvd, Tq, Tk, qk_scale, sm_scale,
                   HEAD_DIM, BLOCK_D, CAUSAL, HAS_KPM, PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _bwd_dq_block(dq, q, do, lse2, delta, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                  stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Add the contribution of keys [start_n, start_n + BLOCK_N) to this query block's dQ."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, cols, offs_d, stride_kn, stride_kd, Tk, HEAD_DIM, BLOCK_D)    # (BLOCK_N, D)
    v = _load_rows(v_base, cols, offs_d, stride_vn, stride_vd, Tk, HEAD_DIM, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N)
    p = tl.math.exp2(s - lse2[:, None])
    if MASK:  # past Tk, k = 0 gives s = 0 and exp2(-lse2) may overflow: mask those too
        keep = cols[None, :] < Tk
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + (Tk - Tq))
        p = tl.where(keep, p, 0.0)
    if HAS_KPM:
        pad = tl.load(kpm_base + cols, mask=cols < Tk, other=0)
        p = tl.where(pad[None, :] != 0, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)                # dP = dO V^T
    ds = p * (dp - delta[:, None])                                           # dS
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)              # dQ += dS K
    return dq


@triton.jit(do_not_specialize=SHAPE_ARGS)
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, KPM, DQ,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   stride_kpm, H, Tq, Tk, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET, BH_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ for BLOCK_M query rows of one (batch, head), looping over the key blocks."""
    pid_m = tl.cdiv(Tq, BLOCK_M) - 1 - tl.program_id(0)  # longest causal rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qm, stride_qd, Tq,
                   HEAD_DIM, BLOCK_D)                                        # (BLOCK_M, D)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dom, stride_dod, Tq,
                    HEAD_DIM, BLOCK_D)
    lse2 = tl.load(LSE + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_kpm
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:  # same key ranges as the forward
        hi = tl.minimum(tl.maximum(pid_m * BLOCK_M + BLOCK_M + (Tk - Tq), 0), Tk)
        full = tl.minimum(tl.maximum(pid_m * BLOCK_M + (Tk - Tq) + 1, 0), Tk)
    else:
        hi = Tk
        full = Tk
    full = (full // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        dq = _bwd_dq_block(dq, q, do, lse2, delta, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                           stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, False, PRECISION)
    for start_n in range(full, hi, BLOCK_N):
        dq = _bwd_dq_block(dq, q, do, lse2, delta, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                           stride_kn, stride_kd, stride_vn, stride_vd, Tq, Tk, qk_scale,
                           HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL, HAS_KPM, True, PRECISION)
    dq = dq * sm_scale                                                       # as dK: S = scale * Q K^T
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, dq, offs_m, offs_d, stride_dqm, stride_dqd, Tq,
                HEAD_DIM, BLOCK_D)


# The one-kernel backward ("One-kernel backward" above; MAGMA_FLASH_BACKWARD=fused forces it).

@triton.jit(do_not_specialize=SHAPE_ARGS)
def _bwd_fused_kernel(Q, K, V, DO, LSE, DELTA, KPM, DK, DV, DQACC,
                      stride_qb, stride_qh, stride_qm, stride_qd,
                      stride_kb, stride_kh, stride_kn, stride_kd,
                      stride_vb, stride_vh, stride_vn, stride_vd,
                      stride_dob, stride_doh, stride_dom, stride_dod,
                      stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                      stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                      stride_kpm, H, Tq, Tk, qk_scale, sm_scale, TQ_BUCKET, TK_BUCKET, BH_BUCKET,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_KPM: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV and dQ of one (batch, head): its key blocks one after another, each looping over the
    query blocks that see it; dQ is summed in the fp32 buffer DQACC (B*H, Tq, BLOCK_D)."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    for start_n in range(0, Tk, BLOCK_N):
        _bwd_key_block(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
                       V + b * stride_vb + h * stride_vh, DO + b * stride_dob + h * stride_doh,
                       LSE + pid_bh * Tq, DELTA + pid_bh * Tq, KPM + b * stride_kpm,
                       DK + b * stride_dkb + h * stride_dkh, DV + b * stride_dvb + h * stride_dvh, start_n,
                       stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_dom, stride_dod,
                       stride_dkn, stride_dkd, stride_dvn, stride_dvd, Tq, Tk, qk_scale, sm_scale,
                       HEAD_DIM, BLOCK_D, CAUSAL, HAS_KPM, PRECISION, BLOCK_M, BLOCK_N,
                       True, DQACC + pid_bh.to(tl.int64) * Tq * BLOCK_D)
        # A query row's dQ gets one addition per key block, maybe from different threads (the masked
        # and unmasked loops are compiled separately): a barrier between key blocks keeps them in order.
        tl.debug_barrier()


# The decode path for Tq = 1 ("Decoding" above): split the keys over programs, then merge.

@triton.jit(do_not_specialize=["H", "Tk", "keys_per_split", "stride_kpm"])
def _decode_kernel(Q, K, V, KPM, OP, LSEP,
                   stride_qb, stride_qh, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_kpm, H, Tk, keys_per_split, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KPM: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flash-decoding, step 1: one query row against keys [split * keys_per_split, ...). Grid:
    (split, b * H + h), so several programs share one row's keys.

    The loop is the forward's own (_fwd_block), so the key and value tiles stream through the tensor
    cores' software pipeline (asynchronous copies several blocks ahead) as they do in the forward.
    A dot needs at least 16 rows: the query is row 0 of a (16, D) tile whose other rows load as 0;
    they compute a harmless softmax of zero scores and are never stored."""
    split = tl.program_id(0)
    n_splits = tl.num_programs(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, 16)                                               # row 0: the query
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, 0, stride_qd, 1,
                   HEAD_DIM, BLOCK_D)                                       # (16, D)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    kpm_base = KPM + b * stride_kpm

    m_i = tl.full([16], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([16], dtype=tl.float32)
    acc = tl.zeros([16, BLOCK_D], dtype=tl.float32)
    # This split's keys: [lo, hi). keys_per_split is a whole number of blocks, so only the last split
    # can end in a partial block, the one block that needs the mask (keys >= hi).
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, Tk)
    full = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    for start_n in range(lo, full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, 1, hi, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, False, PRECISION)
    for start_n in range(full, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, kpm_base, start_n, offs_m, offs_d,
                                   stride_kn, stride_kd, stride_vn, stride_vd, 1, hi, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, False, HAS_KPM, True, PRECISION)
    # An empty split (every key padded) stores lse2 = -inf, unlike _fwd_kernel's +inf: the merge
    # weighs each split by exp2(lse2_s - max), and an empty split must weigh 0. The merge itself
    # stores +inf for a row with no key at all, as the forward does.
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]                           # (16, D)
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    row = pid_bh * n_splits + split                                         # (B*H, splits, BLOCK_D)
    tl.store(OP + row * BLOCK_D + offs_m[:, None] * 0 + offs_d[None, :], o, mask=offs_m[:, None] == 0)
    tl.store(LSEP + row + offs_m * 0, lse2, mask=offs_m == 0)


@triton.jit(do_not_specialize=["H", "n_splits"])
def _decode_merge_kernel(OP, LSEP, O, LSE, stride_ob, stride_oh, stride_od, H, n_splits,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Flash-decoding, step 2: O = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s). Grid:
    (b * H + h,), one program per row merging all its splits."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSEP + pid_bh * n_splits + offs_s, mask=offs_s < n_splits,
                    other=float("-inf"))                                    # (BLOCK_S,)
    o_s = tl.load(OP + (pid_bh * n_splits + offs_s[:, None]) * BLOCK_D + offs_d[None, :],
                  mask=offs_s[:, None] < n_splits, other=0.0)              # (BLOCK_S, BLOCK_D)
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m_safe)                                        # (BLOCK_S,)
    total = tl.sum(w, 0)
    empty = total == 0.0
    o = tl.sum(w[:, None] * o_s, 0) / tl.where(empty, 1.0, total)         # (BLOCK_D,)
    lse2 = tl.where(empty, float("inf"), m_safe + tl.math.log2(tl.where(empty, 1.0, total)))
    tl.store(O + b * stride_ob + h * stride_oh + offs_d * stride_od, o.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + pid_bh, lse2)


# ------------------------------------------------------------------------------------------------
# Launch configurations. (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim: for the
# forward and dQ kernels BLOCK_M is the query block a program owns and BLOCK_N the key block it
# streams; for the dK/dV kernel BLOCK_N is the key block it owns and BLOCK_M the query block it
# streams. These are the usual H100 choices for FlashAttention in Triton (not timed here); on CUDA
# the autotuner times each list once per AUTOTUNE_KEY (sizes, head dim, masks, dtype) and keeps the
# fastest; MAGMA_FLASH_AUTOTUNE=0 uses the first entry only. The forward rescales its (BLOCK_M, D)
# accumulator once per key block, D / BLOCK_N multiplies per score, so its first entries stream 64
# keys or more wherever registers allow. Compiled offline for sm_90a as a launch specializes them
# (`python tests/attention_ptxas_check.py`: ptxas -v, no GPU needed) under Triton 3.9 (CI's) and 3.6
# (PyTorch 2.11's, on our GPU machine), plain, causal and causal with key padding, every bf16 entry
# compiles with a software-pipelined loop (asynchronous copies into shared memory) and fits in 160 KiB
# of shared memory (an H100 block may have 227). Every first entry spills nothing under either
# version; the others spill at most 96 bytes (the forward's (128, 128, 8, 2) at D = 128 under 3.9),
# which the autotuner weighs by timing them.
# The interpreter uses small blocks so that tiny test shapes span several blocks and every loop (and
# tests/attention_interpret_check.py runs every entry above too, at shapes a few of its blocks long).
# ------------------------------------------------------------------------------------------------

FWD_CONFIGS = {
    16: [(128, 64, 4, 3), (128, 128, 4, 3), (64, 64, 4, 3)],
    32: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    64: [(128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
    256: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2)],
}
DKDV_CONFIGS = {
    16: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
    32: [(32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3)],
    # last at D = 64: one warpgroup per 128 keys, two programs per SM (255 registers x 128 threads)
    # where the others fit one: for short sequences, whose programs each see only a few query blocks
    64: [(64, 128, 8, 3), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 128, 4, 3)],
    128: [(32, 128, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (32, 64, 8, 3)],
    256: [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
}
# The one-kernel backward (MAGMA_FLASH_BACKWARD=fused, 16-bit inputs): (BLOCK_M queries streamed,
# BLOCK_N keys held, warps, stages), the dK/dV kernel's tiles with one more dot and the dQ atomics.
# ptxas (sm_90a, bf16): 178-255 registers; spills: 56 bytes for (64, 128) at D = 64 without the
# causal mask under Triton 3.6; under 3.9, 4-8 bytes with a key padding mask at D = 32 and 128; none
# otherwise. (64, 64) tiles spilled 52-192 bytes at D 64 and 128 and were dropped.
FUSED_BWD_CONFIGS = {
    16: [(32, 128, 4, 3), (64, 64, 4, 3)],
    32: [(32, 128, 4, 3), (64, 64, 4, 3)],
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 4)],
    128: [(32, 128, 8, 3), (32, 64, 8, 3)],
    256: [(32, 32, 8, 2), (16, 32, 8, 2)],
}
DQ_CONFIGS = {
    16: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    32: [(128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3)],
    64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
    128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)],
    256: [(64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 8, 2)],
}
# fp32 inputs get one config per kernel (`python tests/attention_ptxas_check.py --dtype tf32|fp32`).
# TF32 dots run on the tensor cores: small tiles, since fp32 tiles take twice the shared memory (the
# dK/dV kernel spills up to ~900 bytes at D >= 128, the others < 100). Exact ("ieee") dots run on
# the FMA units and keep whole operand rows in registers, so they need smaller tiles still: these
# spill at most 24 bytes at D <= 128 under Triton 3.6 and 3.9. At D = 256 every tile tried spilled
# 17-70 KB per thread, so attention(impl="auto") sends exact fp32 at D = 256 to SDPA.
TF32_CONFIGS = {"fwd": (64, 32, 4, 2), "dkdv": (32, 64, 4, 2), "dq": (64, 32, 4, 2)}
TF32_CONFIGS_256 = {"fwd": (32, 16, 4, 2), "dkdv": (16, 32, 4, 2), "dq": (32, 16, 4, 2)}
IEEE_CONFIGS = {64: {"fwd": (64, 32, 8, 2), "dkdv": (32, 32, 8, 2), "dq": (64, 32, 8, 2)},  # D <= 64
                128: {"fwd": (32, 16, 8, 2), "dkdv": (16, 16, 4, 2), "dq": (16, 16, 4, 2)},
                256: TF32_CONFIGS_256}
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1),
                     "fused": (16, 32, 4, 1)}
INTERPRET_DECODE_BLOCK_N = 16
# Decode (Tq = 1): (BLOCK_N keys per step, num_warps, num_stages) per padded head dim. The loop streams
# a (BLOCK_N, D) key tile and a value tile per step (16 KB each in 16 bits at D >= 64), several steps
# ahead: 70-73 KiB of shared memory at D >= 32 (ptxas), three programs per SM. fp32 inputs take half
# the keys per step (the tiles are twice as large), and exact fp32 dots far fewer (they hold operand
# rows in registers; see IEEE_CONFIGS). Compiled for sm_90a under Triton 3.6 and 3.9, every entry is
# software-pipelined and spills nothing (tests/attention_ptxas_check.py --kernels decode).
DECODE_CONFIGS = {16: (128, 4, 3), 32: (256, 4, 3), 64: (128, 4, 3), 128: (64, 4, 3), 256: (32, 4, 3)}
DECODE_CONFIGS_TF32 = {16: (128, 4, 2), 32: (128, 4, 2), 64: (64, 4, 2), 128: (32, 4, 2), 256: (16, 4, 2)}
DECODE_CONFIGS_IEEE = {16: (32, 4, 2), 32: (32, 4, 2), 64: (16, 4, 2), 128: (16, 4, 2), 256: (16, 4, 2)}
MAX_DECODE_SPLITS = 64  # the merge kernel holds (splits, D) partial outputs in registers
MAX_HEAD_DIM = 256
MAX_GRID_Y = 65535  # CUDA's limit on a grid's axis 1, where every kernel puts batch*head
KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "fused": _bwd_fused_kernel}
# MAGMA_FLASH_BACKWARD: the dK/dV and dQ kernels, the one-kernel backward, or the faster of the two
BACKWARDS = ("split", "fused", "auto")
# Every launch asks for fused multiply-adds (a * b + c rounded once: the exp2 arguments and rescales
# above are written for them). Triton 3.9 fuses by default but warns that 3.10 will not.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
# What the autotuner times anew for: lengths and batch*heads as powers of two (so generation, with a
# new Tk every step, does not re-tune, and a config tuned at batch 1, where a few programs cannot fill
# the GPU, is not reused at batch 64), the head dim, the masks (and, added by Triton, the dtypes).
AUTOTUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "BH_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM"]


def _configs(name, block_d, precision=None):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for kernel `name` at this head dim;
    precision is the dot precision of fp32 inputs ("tf32" or "ieee"), None for 16-bit ones."""
    if INTERPRET:
        return [INTERPRET_CONFIGS[name]]
    if precision == "ieee":
        return [IEEE_CONFIGS[max(64, block_d)][name]]
    if precision == "tf32":
        return [(TF32_CONFIGS_256 if block_d > 128 else TF32_CONFIGS)[name]]
    tables = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS, "fused": FUSED_BWD_CONFIGS}
    table = tables[name][block_d]
    return table if os.environ.get("MAGMA_FLASH_AUTOTUNE", "1") != "0" else table[:1]


# Buffers a kernel adds into (atomics) rather than overwrites: the autotuner times each candidate on
# the real arguments, so these are zeroed before every timed run and again before the real one.
AUTOTUNE_RESET = {"fused": ["DQACC"]}


@functools.cache
def _autotuned(name, block_d):
    """Kernel `name` wrapped in Triton's autotuner over its config list (made once per head dim)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _configs(name, block_d)]
    return triton.autotune(configs, key=AUTOTUNE_KEY, reset_to_zero=AUTOTUNE_RESET.get(name))(KERNELS[name])


def tuned_configs(head_dim):
    """{kernel: "BLOCK_MxBLOCK_N wW sS"} of the configs the autotuner last chose at this head dim (for
    bench.py's notes); empty when it has not run (MAGMA_FLASH_AUTOTUNE=0, fp32 inputs, no GPU)."""
    if TRITON_IMPORT_ERROR is not None:
        return {}
    block_d = max(16, _pow2(head_dim))
    chosen = {}
    for name in KERNELS:
        best = getattr(_autotuned(name, block_d), "best_config", None)  # set by the tuner's first run
        if best is not None:
            chosen[name] = (f"{best.kwargs['BLOCK_M']}x{best.kwargs['BLOCK_N']} "
                            f"w{best.num_warps} s{best.num_stages}")
    return chosen


def _launch(name, block_d, grid, args, consts):
    """Run kernel `name`: a fixed config, or autotuned over a list. `grid(BLOCK_M, BLOCK_N)` gives the
    launch grid for the config chosen."""
    configs = _configs(name, block_d, consts["PRECISION"] if args[0].dtype == torch.float32 else None)
    if len(configs) == 1:
        m, n, w, s = configs[0]
        KERNELS[name][grid(m, n)](*args, **consts, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s,
                                  **LAUNCH_OPTIONS)
    else:
        tuned = _autotuned(name, block_d)
        tuned[lambda meta: grid(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **consts, **LAUNCH_OPTIONS)


# ------------------------------------------------------------------------------------------------
# Host side: checks, the forward/backward launchers and their autograd wiring (custom operators)
# ------------------------------------------------------------------------------------------------

def _backward_kind():
    """MAGMA_FLASH_BACKWARD: "split" (the default: the dK/dV and dQ kernels), "fused" (the one-kernel
    backward) or "auto" (whichever was timed faster for the shape class, _choose_backward)."""
    kind = os.environ.get("MAGMA_FLASH_BACKWARD", "split")
    if kind not in BACKWARDS:
        raise ValueError(f"unknown MAGMA_FLASH_BACKWARD={kind!r}; choose one of {BACKWARDS}")
    return kind


def _pow2(n):
    """The smallest power of two >= n: the padded head dim, and the buckets of lengths and batch*heads
    in the autotuner's key. (triton.next_power_of_2 and triton.cdiv work on the host too, but as
    Triton functions they cost ~5 us a call, several per attention call: these two are plain Python.)"""
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a, b):
    """ceil(a / b) for ints a >= 0, b > 0."""
    return -(-a // b)


def _flash_check(q, k, v, key_padding_mask):
    """Raise a clear error when the Triton kernel cannot run on these inputs."""
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(f"flash_attention needs Triton, which failed to import "
                           f"({TRITON_IMPORT_ERROR}); use attention(..., impl='sdpa') instead")
    _check(q, k, v, key_padding_mask)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"flash_attention supports float16, bfloat16 and float32; {name} is {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"q, k, v must share dtype and device; {name} is {t.dtype} on {t.device}, "
                             f"q is {q.dtype} on {q.device}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head dims up to {MAX_HEAD_DIM}; q has {q.shape[-1]}")
    if q.shape[1] > MAX_GRID_Y:  # a batch is split across launches when B * H is too many, not a head
        raise ValueError(f"flash_attention supports up to {MAX_GRID_Y} heads; q has {q.shape[1]}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(f"flash_attention runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1 "
                           f"set before triton is imported); q is on {q.device}")


def _flash_scale(q, scale):
    """The softmax scale as a float (default 1/sqrt(D)). The kernel needs it > 0: it scales the row
    maximum of the unscaled scores, which is the maximum of the scaled ones only for a positive scale."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"flash_attention needs scale > 0, got {scale}; use impl='sdpa' or 'reference'")
    return scale


def _flash_supported(q, k, v, scale=None):
    """Whether attention(impl="auto") runs the kernel on these inputs."""
    exact_fp32_d256 = q.dtype == torch.float32 and q.shape[-1] > 128 and _precision(q.dtype) == "ieee"
    return (TRITON_IMPORT_ERROR is None and q.is_cuda and q.shape[-1] <= MAX_HEAD_DIM and q.shape[1] <= MAX_GRID_Y
            and (scale is None or scale > 0) and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and k.dtype == q.dtype and v.dtype == q.dtype and not exact_fp32_d256)  # it spills: see IEEE_CONFIGS


def _precision(dtype):
    """Dot precision for fp32 inputs: exact unless PyTorch's own CUDA matmuls may use TF32."""
    if dtype != torch.float32:
        return "tf32"  # ignored by Triton for fp16/bf16 inputs
    # "ieee", "tf32" or "none" (inherit the global setting); torch.set_float32_matmul_precision and
    # allow_tf32 set it too. (torch.get_float32_matmul_precision() raises once the APIs are mixed.)
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # PyTorch < 2.9: allow_tf32 alone
        return "tf32" if matmul.allow_tf32 else "ieee"
    setting = matmul.fp32_precision
    if setting == "none":
        setting = torch.backends.fp32_precision
    return "tf32" if setting == "tf32" else "ieee"


def _as_kpm(key_padding_mask, q):
    """The (B, Tk) mask as contiguous uint8 (1 = keep) on q's device, and its batch stride."""
    if key_padding_mask is None:
        return q, 0  # a dummy pointer; HAS_KPM=False means it is never read
    kpm = key_padding_mask
    if kpm.dtype != torch.uint8 or kpm.device != q.device or not kpm.is_contiguous():
        kpm = kpm.to(device=q.device, dtype=torch.bool).to(torch.uint8).contiguous()
    return kpm, kpm.stride(0)


@functools.cache
def _sm_count(device):
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decode_config(block_d, dtype, precision):
    """(BLOCK_N, num_warps, num_stages) of the decode kernel for this head dim and input dtype."""
    if INTERPRET:
        return INTERPRET_DECODE_BLOCK_N, 4, 1
    if dtype != torch.float32:
        return DECODE_CONFIGS[block_d]
    return (DECODE_CONFIGS_IEEE if precision == "ieee" else DECODE_CONFIGS_TF32)[block_d]


def _decode_splits(BH, Tk, block_n, device):
    """How many programs share one row's keys: ~4 programs per SM, >= 2 key blocks each (a guess:
    `bench.py attention` compares 1, 4 and 16 splits on the decode shape)."""
    if device.type != "cuda":
        return 1
    return max(1, min(_cdiv(4 * _sm_count(device), BH), _cdiv(Tk, 2 * block_n), MAX_DECODE_SPLITS))


def _flash_decode_forward(q, k, v, kpm, kpm_stride, qk_scale, num_splits):
    """Forward for Tq == 1 by split-K flash-decoding: returns o (B, H, 1, D) and lse2 (B, H, 1)."""
    B, H, _, D = q.shape
    Tk = k.shape[2]
    block_d = max(16, _pow2(D))
    precision = _precision(q.dtype)
    block_n, warps, stages = _decode_config(block_d, q.dtype, precision)
    if num_splits is None:
        num_splits = _decode_splits(B * H, Tk, block_n, q.device)
    num_splits = max(1, min(int(num_splits), Tk, MAX_DECODE_SPLITS))
    keys_per_split = _cdiv(_cdiv(Tk, num_splits), block_n) * block_n
    num_splits = _cdiv(Tk, keys_per_split)  # no empty splits
    o_part = torch.empty(B * H, num_splits, block_d, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B * H, num_splits, device=q.device, dtype=torch.float32)
    _decode_kernel[(num_splits, B * H)](
        q, k, v, kpm, o_part, lse_part,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        kpm_stride, H, Tk, keys_per_split, qk_scale,
        HEAD_DIM=D, BLOCK_D=block_d, HAS_KPM=kpm is not q, PRECISION=precision, BLOCK_N=block_n,
        num_warps=warps, num_stages=stages, **LAUNCH_OPTIONS)
    o = torch.empty_like(q)
    lse2 = torch.empty(B, H, 1, device=q.device, dtype=torch.float32)
    _decode_merge_kernel[(B * H,)](
        o_part, lse_part, o, lse2, o.stride(0), o.stride(1), o.stride(3), H, num_splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, _pow2(num_splits)), num_warps=4,
        **LAUNCH_OPTIONS)
    return o, lse2


def _batch_slices(B, H):
    """Slices of the batch whose B*H programs fit on grid axis 1 (one slice unless B*H > MAX_GRID_Y)."""
    step = max(1, MAX_GRID_Y // H)
    return [slice(b, b + step) for b in range(0, B, step)]


def _flash_forward(q, k, v, causal, kpm, kpm_stride, scale, decode_splits=None):
    """Launch the forward: o like q (same layout when q is dense), lse2 (B, H, Tq) fp32 base 2.
    decode_splits applies when Tq == 1: None = the decode path with an automatic split count, n >= 1
    = the decode path with n splits, 0 = no decode path (the block kernel; bench.py compares them)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    qk_scale = scale * LOG2E  # scores in base 2
    if B * H * Tq == 0 or Tk == 0:
        return torch.zeros_like(q), torch.full((B, H, Tq), float("inf"), device=q.device, dtype=torch.float32)
    if B * H > MAX_GRID_Y:  # too many rows for one grid: a launch per slice of the batch
        o, lse2 = torch.empty_like(q), torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
        for s in _batch_slices(B, H):
            qs = q[s]  # a slice's mask is its rows of kpm, or its own q when there is no mask
            o[s], lse2[s] = _flash_forward(qs, k[s], v[s], causal, qs if kpm is q else kpm[s], kpm_stride,
                                           scale, decode_splits)
        return o, lse2
    if Tq == 1 and decode_splits != 0:  # causal is a no-op for one query: it is the last position
        return _flash_decode_forward(q, k, v, kpm, kpm_stride, qk_scale, decode_splits)
    o = torch.empty_like(q)  # keeps q's memory layout, so a (B, T, H, D)-ordered q gives such an o
    lse2 = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    block_d = max(16, _pow2(D))
    args = (q, k, v, o, lse2, kpm, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            kpm_stride, H, Tq, Tk, qk_scale, _pow2(Tq), _pow2(Tk), _pow2(B * H))
    consts = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_KPM=kpm is not q,
                  PRECISION=_precision(q.dtype))
    _launch("fwd", block_d, lambda bm, bn: (_cdiv(Tq, bm), B * H), args, consts)
    return o, lse2


def _flash_backward(do, q, k, v, o, lse2, causal, kpm, kpm_stride, scale, need_dq=True, backward="split"):
    """Launch the backward kernels: delta pre-pass, dK/dV, dQ; or, backward="fused", the one-kernel
    backward (16-bit inputs, dQ wanted); or, "auto", whichever of the two was timed faster for this
    shape class (_choose_backward). Returns dq (None unless need_dq), dk, dv."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H * Tq == 0 or Tk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if B * H > MAX_GRID_Y:  # as in the forward: a launch per slice of the batch
        for s in _batch_slices(B, H):
            qs = q[s]
            dqs, dk[s], dv[s] = _flash_backward(do[s], qs, k[s], v[s], o[s], lse2[s], causal,
                                                qs if kpm is q else kpm[s], kpm_stride, scale, need_dq, backward)
            if need_dq:
                dq[s] = dqs
        return (dq if need_dq else None), dk, dv
    fused_runs = need_dq and (q.dtype != torch.float32 or INTERPRET)  # (fp32 on a GPU: dK/dV and dQ)
    if backward == "auto":  # the one timed faster for this shape class, where both can run and be timed
        rerun = lambda kind: _flash_backward(do, q, k, v, o, lse2, causal, kpm, kpm_stride, scale, need_dq, kind)
        backward = _choose_backward(_backward_key(q, k, causal, kpm is not q), q, rerun) if fused_runs else "split"
    block_d = max(16, _pow2(D))
    qk_scale = scale * LOG2E
    delta = torch.empty(B, H, Tq, device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(_cdiv(Tq, 64), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Tq,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=64, num_warps=4, **LAUNCH_OPTIONS)
    consts = dict(HEAD_DIM=D, BLOCK_D=block_d, CAUSAL=bool(causal), HAS_KPM=kpm is not q,
                  PRECISION=_precision(q.dtype))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (kpm_stride, H, Tq, Tk, qk_scale, scale, _pow2(Tq), _pow2(Tk), _pow2(B * H))
    if backward == "fused" and fused_runs:
        dq_acc = torch.zeros(B * H, Tq, block_d, device=q.device, dtype=torch.float32)  # summed into
        _launch("fused", block_d, lambda bm, bn: (B * H,),
                (q, k, v, do, lse2, delta, kpm, dk, dv, dq_acc, *common, *dk.stride(), *dv.stride(), *tail),
                consts)
        dq.copy_(dq_acc.view(B, H, Tq, block_d)[..., :D].mul_(scale))  # as dK: S = scale * Q K^T
        return dq, dk, dv
    _launch("dkdv", block_d, lambda bm, bn: (_cdiv(Tk, bn), B * H),
            (q, k, v, do, lse2, delta, kpm, dk, dv, *common, *dk.stride(), *dv.stride(), *tail), consts)
    if not need_dq:
        return None, dk, dv
    _launch("dq", block_d, lambda bm, bn: (_cdiv(Tq, bm), B * H),
            (q, k, v, do, lse2, delta, kpm, dq, *common, *dq.stride(), *tail), consts)
    return dq, dk, dv


# MAGMA_FLASH_BACKWARD=auto: the backward timed faster, per shape class (the autotuner's key), like a
# launch config; MAGMA_FLASH_AUTOTUNE=0 pins the two-kernel one, as it pins the configs.
BACKWARD_CHOICES = {}  # (device, dtype, head dim, causal, key padding, Tq, Tk, B*H buckets) -> "split" | "fused"


def _backward_key(q, k, causal, has_kpm):
    """The shape class a choice holds for: the autotuner's key (AUTOTUNE_KEY), with the device and dtype."""
    B, H, Tq, D = q.shape
    return q.device, q.dtype, D, bool(causal), bool(has_kpm), _pow2(Tq), _pow2(k.shape[2]), _pow2(B * H)


def _can_time_backwards(q):
    """Whether auto may choose here: on a GPU with autotuning on."""
    return q.is_cuda and os.environ.get("MAGMA_FLASH_AUTOTUNE", "1") != "0"


def _capturing(q):
    """Whether a CUDA graph is being captured on q's stream (nothing may be timed then)."""
    return q.is_cuda and torch.cuda.is_current_stream_capturing()


def _time_backward_ms(run):
    """GPU milliseconds per run() (a whole backward), as the autotuner times a config: the first call
    compiles and autotunes its kernels. Waits for the GPU: it runs once per shape class."""
    from triton.testing import do_bench
    return do_bench(run)


def _choose_backward(key, q, run):
    """"split" or "fused" for this shape class: the one that ran faster when both were timed on its
    first backward (run(kind) runs a whole backward); "split" where auto may not choose, and while a
    graph is captured before the class was timed."""
    if not _can_time_backwards(q):
        return "split"
    if key not in BACKWARD_CHOICES:
        if _capturing(q):
            return "split"
        times = {kind: _time_backward_ms(lambda: run(kind)) for kind in ("split", "fused")}
        BACKWARD_CHOICES[key] = min(times, key=times.get)
    return BACKWARD_CHOICES[key]


def on_device(t):
    """Launch on t's GPU (Triton launches on the current device), a no-op on CPU (also magma.py's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# The autograd wiring. Under torch.compile: two custom operators (torch.library) and the rule that
# connects them; to torch.compile each operator is one opaque node with a known output shape, so a
# compiled model keeps the kernel and is not split into pieces around the Triton launches and the
# autotuner; autograd calls the backward operator with what the forward saved: q, k, v, o and the row
# log-sum-exp. Eager training takes a plain autograd.Function over the same launchers (cheaper on the
# host), and eager inference calls the forward launcher directly.

def _forward(q, k, v, kpm, causal, scale):
    """o (like q) and lse2 (B, H, Tq) fp32; kpm is the uint8 (B, Tk) mask or None."""
    kpm, kpm_stride = _as_kpm(kpm, q)
    with on_device(q):
        return _flash_forward(q, k, v, causal, kpm, kpm_stride, scale)


def _backward_launch(do, q, k, v, o, lse2, kpm, causal, scale, need_dq, backward):
    """dq (None unless need_dq), dk, dv from what the forward saved; kpm as in _forward."""
    kpm, kpm_stride = _as_kpm(kpm, q)
    with on_device(q):
        return _flash_backward(do, q, k, v, o, lse2, causal, kpm, kpm_stride, scale, need_dq, backward)


@torch.library.custom_op("magma::flash_attention_forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: Optional[torch.Tensor],
                causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, kpm, causal, scale)


@_forward_op.register_fake
def _(q, k, v, kpm, causal, scale):  # shapes only, for torch.compile's tracing
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("magma::flash_attention_backward", mutates_args=())
def _backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse2: torch.Tensor, kpm: Optional[torch.Tensor], causal: bool, scale: float,
                 need_dq: bool, backward: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq (empty when not needed), dk, dv."""
    dq, dk, dv = _backward_launch(do, q, k, v, o, lse2, kpm, causal, scale, need_dq, backward)
    return (dq if need_dq else q.new_empty(0)), dk, dv


@_backward_op.register_fake
def _(do, q, k, v, o, lse2, kpm, causal, scale, need_dq, backward):
    return (torch.empty_like(q) if need_dq else q.new_empty(0)), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kpm, causal, scale = inputs
    o, lse2 = output
    ctx.save_for_backward(q, k, v, o, lse2, kpm)
    ctx.causal, ctx.scale, ctx.backward = causal, scale, _backward_kind()
    ctx.set_materialize_grads(False)  # lse2 is an internal output: no zero gradient is made for it


def _backward(ctx, do, _dlse2):  # _dlse2 is None
    q, k, v, o, lse2, kpm = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    dq, dk, dv = _backward_op(do, q, k, v, o, lse2, kpm, ctx.causal, ctx.scale, need_dq, ctx.backward)
    return (dq if need_dq else None), dk, dv, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerFlashAttention(torch.autograd.Function):
    """The same forward and backward for eager training, without the custom operators, whose Python
    dispatch and autograd wrapper cost the host about twice as much: measured on this project's 2-core
    CPU VM with the kernel launches stubbed out, a forward+backward took ~240-390 us through the
    operators and ~105-190 us through this Function (eager inference: ~8-18 us)."""

    @staticmethod
    def forward(ctx, q, k, v, kpm, causal, scale):
        o, lse2 = _forward(q, k, v, kpm, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse2, kpm)
        ctx.causal, ctx.scale, ctx.backward = causal, scale, _backward_kind()
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():  # autograd.grad(..., create_graph=True): no 2nd derivative here
            raise RuntimeError("flash_attention has no double backward (create_graph=True); use "
                               "attention(..., impl='sdpa') or impl='reference' for higher derivatives")
        q, k, v, o, lse2, kpm = ctx.saved_tensors
        dq, dk, dv = _backward_launch(do, q, k, v, o, lse2, kpm, ctx.causal, ctx.scale, ctx.needs_input_grad[0],
                                      ctx.backward)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=False, key_padding_mask=None, scale=None):
    """The fused Triton kernel (forward and backward) with the semantics of attention_reference."""
    _flash_check(q, k, v, key_padding_mask)
    scale = _flash_scale(q, scale)
    kpm = None if key_padding_mask is None else _as_kpm(key_padding_mask, q)[0]  # uint8, converted once
    if torch.compiler.is_compiling():  # one opaque node in the graph, autograd through _backward_op
        return _forward_op(q, k, v, kpm, bool(causal), scale)[0]  # (B, H, Tq, D)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if not needs_grad:  # eager inference: the launcher alone
        return _forward(q, k, v, kpm, bool(causal), scale)[0]  # (B, H, Tq, D)
    return _EagerFlashAttention.apply(q, k, v, kpm, bool(causal), scale)  # (B, H, Tq, D)


def flash_decode(q, k, v, key_padding_mask=None, scale=None, num_splits=None):
    """Forward-only decode of one query per row, q (B, H, 1, D), keys split over `num_splits`
    programs (None = enough to fill the GPU; 1 = one program per row; at most 64) and merged by
    log-sum-exp.
    flash_attention takes this path by itself whenever Tq == 1."""
    if num_splits is not None and not num_splits >= 1:
        raise ValueError(f"flash_decode: num_splits must be None (automatic) or >= 1, got {num_splits}")
    _flash_check(q, k, v, key_padding_mask)
    if q.shape[2] != 1:
        raise ValueError(f"flash_decode takes one query per row, q is {tuple(q.shape)}")
    scale = _flash_scale(q, scale)
    kpm, kpm_stride = _as_kpm(key_padding_mask, q)
    with torch.no_grad(), on_device(q):
        o, _ = _flash_forward(q, k, v, False, kpm, kpm_stride, scale, decode_splits=num_splits)
    return o


# ------------------------------------------------------------------------------------------------
# The dispatcher
# ------------------------------------------------------------------------------------------------

def attention(q, k, v, causal=False, key_padding_mask=None, scale=None, impl=None):
    """Scaled dot-product attention with the semantics above; `impl` forces an implementation."""
    impl = impl or os.environ.get("MAGMA_ATTENTION", "auto")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r} (impl= or MAGMA_ATTENTION); "
                         f"choose one of {IMPLEMENTATIONS}")
    if impl == "reference":
        return attention_reference(q, k, v, causal, key_padding_mask, scale)
    if impl == "triton" or (impl == "auto" and _flash_supported(q, k, v, scale)):
        return flash_attention(q, k, v, causal, key_padding_mask, scale)
    return sdpa(q, k, v, causal, key_padding_mask, scale)
