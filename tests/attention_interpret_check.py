"""Check the Triton attention kernel on CPU under the Triton interpreter (run as a script).

    python tests/attention_interpret_check.py [--json results.json] [--only NAME ...]

TRITON_INTERPRET=1 must be set before triton is first imported, so tests/test_attention.py runs
this file in a fresh subprocess instead of importing the kernel into the pytest process. Each case
compares attention.flash_attention with attention.attention_reference: the forward and dq, dk, dv
in fp32 (max abs error <= 1e-4; the interpreter's fp32 dot is an exact numpy matmul), and in fp16
by FlashAttention's rule (at most twice the error of plain PyTorch in fp16, plus 1e-4), against
the fp32 reference. Rows that see no key must be exactly 0, with exactly 0 gradient. Extra checks:
flash-decoding with forced split counts, the autotuned launch path, torch.compile, a custom scale,
batches split over several launches, and every launch configuration the GPU may use. The
interpreter runs one program at a time, so the shapes are tiny; with its 32x16 blocks they still
span several blocks (full, diagonal, ragged and skipped ones); the GPU's configurations get shapes of
a few of their own blocks (about a minute in all). bf16 is left to the GPU tests: the interpreter
mishandles bf16 dots.
"""
import argparse
import json
import math
import os
import sys
import time

# name: (B, H, Tq, Tk, D, causal, mask, dtype, layout)
#   mask: None | "left_pad" (row b has b*3 leading pads) | "left_pad_empty" (also one row all pads)
#   layout: "contiguous" | "bthd" (q, k, v, dO are transposed (B, T, H, D) views; k, v from one packed tensor)
CASES = {
    "odd_37_causal_d16": (1, 2, 37, 37, 16, True, None, "float32", "contiguous"),
    "odd_37_full_d32": (2, 1, 37, 37, 32, False, None, "float32", "contiguous"),
    "prefill_5_of_23_causal_d64": (2, 2, 5, 23, 64, True, None, "float32", "contiguous"),
    "more_queries_23_than_keys_5_causal": (1, 2, 23, 5, 32, True, None, "float32", "contiguous"),
    "decode_1_of_23_left_pad_d64": (3, 2, 1, 23, 64, True, "left_pad_empty", "float32", "contiguous"),
    "padding_with_empty_row_d32": (3, 1, 9, 23, 32, False, "left_pad_empty", "float32", "contiguous"),
    "causal_left_pad_empty_19": (3, 1, 19, 19, 16, True, "left_pad_empty", "float32", "contiguous"),
    "causal_70_d64": (1, 1, 70, 70, 64, True, None, "float32", "contiguous"),
    "head_dim_128_causal": (1, 1, 37, 37, 128, True, None, "float32", "contiguous"),
    "head_dim_40_padded": (1, 2, 20, 37, 40, False, "left_pad", "float32", "contiguous"),
    "non_contiguous_bthd": (2, 3, 21, 21, 32, True, None, "float32", "bthd"),
    "fp16_causal_d64": (2, 2, 37, 37, 64, True, None, "float16", "contiguous"),
    "fp16_padded_d128": (3, 1, 5, 23, 128, False, "left_pad", "float16", "contiguous"),
    "fp16_decode_d16": (2, 2, 1, 40, 16, True, "left_pad_empty", "float16", "contiguous"),
}
FP32_TOL = 1e-4
FP16_SLACK = 1e-4


def make_inputs(torch, B, H, Tq, Tk, D, mask, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if layout == "bthd":  # what the models produce: x.view(B, T, H, D).transpose(1, 2)
        q = torch.randn(B, Tq, H, D, generator=g).to(dt).transpose(1, 2)
        kv = torch.randn(B, Tk, 2, H, D, generator=g).to(dt)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        do = torch.randn(B, Tq, H, D, generator=g).to(dt).transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous() or do.is_contiguous())
    else:
        q = torch.randn(B, H, Tq, D, generator=g).to(dt)
        k = torch.randn(B, H, Tk, D, generator=g).to(dt)
        v = torch.randn(B, H, Tk, D, generator=g).to(dt)
        do = torch.randn(B, H, Tq, D, generator=g).to(dt)
    kpm = None
    if mask is not None:
        kpm = torch.ones(B, Tk, dtype=torch.bool)
        for b in range(B):
            kpm[b, :min(3 * b, Tk)] = False  # left padding, as in a batch of prompts
        if mask == "left_pad_empty":
            kpm[-1] = False  # this sequence has no real key: all its rows must be 0
    return q, k, v, do, kpm


def naive_low_precision(torch, q, k, v, causal, kpm, A):
    """Plain PyTorch attention computed entirely in q's dtype (the baseline for the 2x rule)."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = A.visible_mask(q.shape[2], k.shape[2], causal, kpm, q.device)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    if mask is not None:
        att = att.masked_fill(~mask, 0.0)
    return att @ v


def run_case(name, torch, A):
    B, H, Tq, Tk, D, causal, mask, dtype, layout = CASES[name]
    q, k, v, do, kpm = make_inputs(torch, B, H, Tq, Tk, D, mask, dtype, layout,
                                   seed=sum(map(ord, name)))
    t0 = time.time()
    res = {"case": name}
    if dtype == "float32":
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = A.attention(q, k, v, causal, kpm, impl="triton")  # through the dispatcher
        grads = torch.autograd.grad(out, (q, k, v), do)
        ref = A.attention_reference(q, k, v, causal, kpm)
        ref_grads = torch.autograd.grad(ref, (q, k, v), do)
        for key, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            res[f"{key}_err"] = (a - b).abs().max().item()
        res["tol"] = FP32_TOL
        errs = [res[f"{key}_err"] for key in ("out", "dq", "dk", "dv")]
        ok = all(e <= FP32_TOL for e in errs)  # NaN compares False, so it fails here too
        tensors = (out, *grads)
    else:  # FlashAttention's rule against an fp32 reference, for the output and the gradients
        def run(fn, *inputs):
            inputs = [t.detach().requires_grad_() for t in inputs]
            out = fn(*inputs, causal, kpm)
            return (out, *torch.autograd.grad(out, inputs, do.to(out.dtype)))
        ours = run(A.flash_attention, q, k, v)
        want = run(A.attention_reference, q.float(), k.float(), v.float())
        naive = run(lambda *a: naive_low_precision(torch, *a, A), q, k, v)
        ok = True
        for key, a, n, w in zip(("out", "dq", "dk", "dv"), ours, naive, want):
            res[f"{key}_err"] = (a.float() - w).abs().max().item()
            res[f"{key}_torch_fp16_err"] = (n.float() - w).abs().max().item()
            ok = ok and res[f"{key}_err"] <= 2 * res[f"{key}_torch_fp16_err"] + FP16_SLACK
        out, grads = ours[0], ours[1:]
        tensors = ours
    res["finite"] = all(bool(torch.isfinite(t).all()) for t in tensors)
    if layout == "bthd":  # the output and gradients come back (B, T, H, D)-ordered, as the models' heads
        res["bthd_out_and_grads"] = all(t.transpose(1, 2).is_contiguous() for t in tensors)
        ok = ok and res["bthd_out_and_grads"]
    with torch.no_grad():  # inference skips the custom operator: the same kernel, the same output
        res["no_grad_equal"] = bool(torch.equal(A.flash_attention(q.detach(), k.detach(), v.detach(), causal, kpm), out))
    ok = ok and res["finite"] and res["no_grad_equal"]
    if mask is not None or (causal and Tq > Tk):
        # Rows that see no key: output exactly 0, and (fp32 cases) gradient exactly 0 for them.
        seen = A.visible_mask(Tq, Tk, causal, kpm, q.device).expand(B, H, Tq, Tk).any(-1)  # (B, H, Tq)
        empty = ~seen
        res["empty_rows"] = int(empty.sum())
        zero = bool((out[empty] == 0).all())
        if grads:
            zero = zero and bool((grads[0][empty] == 0).all())
            if kpm is not None:  # padded keys get no gradient
                pads = ~kpm[:, None, :].expand(B, H, Tk)
                zero = zero and bool((grads[1][pads] == 0).all()) and bool((grads[2][pads] == 0).all())
        res["masked_exact_zero"] = zero
        ok = ok and zero
    res["ok"] = ok
    res["seconds"] = round(time.time() - t0, 2)
    return res


def run_decode_split_check(torch, A):
    """Flash-decoding with several splits (forced) against the reference and against 1 split."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 1, 128, generator=g)
    k = torch.randn(2, 3, 70, 128, generator=g)
    v = torch.randn(2, 3, 70, 128, generator=g)
    kpm = torch.ones(2, 70, dtype=torch.bool)
    kpm[1, :40] = False  # the first splits of row 1 are empty: their partial lse is -inf
    ref = A.attention_reference(q, k, v, False, kpm)
    res = {"case": "decode_split_k_merge"}
    for splits in (1, 3, 5):
        res[f"out_err_splits_{splits}"] = (A.flash_decode(q, k, v, kpm, num_splits=splits) - ref).abs().max().item()
    # the most splits there may be (MAX_DECODE_SPLITS = 64 partial results for the merge to hold)
    q = torch.randn(2, 1, 1, 64, generator=g)
    k, v = (torch.randn(2, 1, 1024, 64, generator=g) for _ in range(2))  # 64 splits of 16 keys
    kpm = torch.ones(2, 1024, dtype=torch.bool)
    kpm[1, :700] = False
    splits = A.MAX_DECODE_SPLITS
    res[f"out_err_splits_{splits}"] = (A.flash_decode(q, k, v, kpm, num_splits=splits)
                                       - A.attention_reference(q, k, v, False, kpm)).abs().max().item()
    res["tol"] = FP32_TOL
    res["ok"] = all(e <= FP32_TOL for key, e in res.items() if key.startswith("out_err"))
    return res


def run_autotune_check(torch, A):
    """The CUDA launch path (attention._autotuned: triton.autotune over several configs, grid from the
    chosen BLOCK_M/N) with a stand-in benchmarker, for either backward: every config must give the
    reference's answer, including the one-kernel backward's dQ, which the timing runs add into."""
    import triton
    configs = [(32, 16, 4, 1), (16, 32, 4, 1), (64, 64, 4, 1)]
    timed = []

    def fake_bench(fn, quantiles=None, **kw):
        fn()
        timed.append(1)
        t = float(len(timed) % 3)  # a different config wins for each kernel
        return [t, t, t] if quantiles else t

    res = {"case": "autotune_launcher", "tol": FP32_TOL}
    ok = True
    real_autotune, saved_configs = triton.autotune, A._configs
    saved_env = os.environ.get("MAGMA_FLASH_BACKWARD")
    triton.autotune = lambda *args, **kw: real_autotune(*args, do_bench=fake_bench, **kw)
    A._configs = lambda name, block_d, precision=None: configs
    try:
        for backward, launches in (("split", 3), ("fused", 2)):  # fwd, dkdv, dq / fwd, fused
            os.environ["MAGMA_FLASH_BACKWARD"] = backward
            A._autotuned.cache_clear()  # tuned afresh: the first call of a key is the one at risk
            timed.clear()
            g = torch.Generator().manual_seed(3)
            q, k, v = (torch.randn(2, 2, 37, 32, generator=g).requires_grad_() for _ in range(3))
            kpm = torch.ones(2, 37, dtype=torch.bool)
            kpm[1, :5] = False
            do = torch.randn(2, 2, 37, 32, generator=g)
            out = A.flash_attention(q, k, v, True, kpm)
            grads = torch.autograd.grad(out, (q, k, v), do)
            ref = A.attention_reference(q, k, v, True, kpm)
            ref_grads = torch.autograd.grad(ref, (q, k, v), do)
            res[f"{backward}_configs_timed"] = len(timed)
            for key, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                res[f"{backward}_{key}_err"] = err = (a - b).abs().max().item()
                ok = ok and err <= FP32_TOL
            ok = ok and len(timed) == 3 * launches
    finally:
        triton.autotune, A._configs = real_autotune, saved_configs
        A._autotuned.cache_clear()
        if saved_env is None:
            os.environ.pop("MAGMA_FLASH_BACKWARD", None)
        else:
            os.environ["MAGMA_FLASH_BACKWARD"] = saved_env
    res["ok"] = ok
    return res


def run_compile_check(torch, A):
    """torch.compile sees flash_attention as one opaque operator: one graph, no break (the kernel is
    not traced into), torch.library.opcheck accepts the operator (schema, fake tensors, autograd
    registration), and a compiled forward+backward (aot_eager backend) equals the eager one exactly."""
    import torch._dynamo
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 21, 16, generator=g, requires_grad=True) for _ in range(3))
    kpm = torch.ones(2, 21, dtype=torch.bool)
    kpm[1, :4] = False

    def loss(q, k, v, kpm):
        return A.flash_attention(q, k, v, True, kpm).square().sum()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(q, k, v, kpm)
    checks = torch.library.opcheck(A._forward_op, (q, k, v, A._as_kpm(kpm, q)[0], True, 0.25))
    # the models' strides too: their fake outputs must have the launchers' (B, T, H, D)-ordered layout
    qkv = torch.randn(2, 21, 3, 2, 16, generator=g)
    qs, ks, vs = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    strided = torch.library.opcheck(A._forward_op, (qs, ks, vs, None, True, 0.25))
    o, lse2 = A._forward(qs.detach(), ks.detach(), vs.detach(), None, True, 0.25)
    strided_bwd = torch.library.opcheck(A._backward_op, (torch.randn_like(o), qs.detach(), ks.detach(), vs.detach(),
                                                         o, lse2, None, True, 0.25, True, "split"))
    checks = {**checks, **{f"strided {k}": v for k, v in strided.items()},
              **{f"strided backward {k}": v for k, v in strided_bwd.items()}}
    # (opcheck does not compare strides: the fake outputs' against the real ones', here)
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = [t.detach() for t in (qs, ks, vs)] + [o, lse2]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        fake_strides = [t.stride() for t in (*A._forward_op(*fake[:3], None, True, 0.25),
                                             *A._backward_op(torch.empty_like(fake[3]), *fake, None, True, 0.25,
                                                             True, "split"))]
    real_strides = [t.stride() for t in (o, lse2, *A._backward_op(torch.randn_like(o), *real, None, True, 0.25,
                                                                  True, "split"))]
    checks["fake strides = real strides"] = "SUCCESS" if fake_strides == real_strides else f"{fake_strides} vs {real_strides}"
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, kpm), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v, kpm), (q, k, v))
    torch._dynamo.reset()
    res = {"case": "torch_compile_one_opaque_op", "graphs": explained.graph_count,
           "graph_breaks": explained.graph_break_count, "opcheck": checks,
           "compiled_grad_diff": max((a - b).abs().max().item() for a, b in zip(got, want))}
    res["ok"] = (res["graphs"] == 1 and res["graph_breaks"] == 0 and set(checks.values()) == {"SUCCESS"}
                 and res["compiled_grad_diff"] == 0.0)
    return res


def run_scale_check(torch, A):
    """A scale other than 1/sqrt(D) (the kernel applies it to the row maximum and inside exp2), with a
    causal mask and padding: output and gradients against the reference; a scale <= 0 is refused."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 2, 29, 32, generator=g, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 2, 29, 32, generator=g)
    kpm = torch.ones(2, 29, dtype=torch.bool)
    kpm[1, :6] = False
    res = {"case": "custom_scale"}
    for scale in (0.05, 2.0):
        out = A.flash_attention(q, k, v, True, kpm, scale=scale)
        ref = A.attention_reference(q, k, v, True, kpm, scale=scale)
        got, want = (torch.autograd.grad(t, (q, k, v), do) for t in (out, ref))
        res[f"err_scale_{scale}"] = max((a - b).abs().max().item() for a, b in zip((out, *got), (ref, *want)))
    refused = []
    for scale in (0.0, -0.125):
        try:
            A.flash_attention(q, k, v, scale=scale)
        except ValueError:
            refused.append(scale)
    res["refused"] = refused
    res["tol"] = FP32_TOL
    res["ok"] = len(refused) == 2 and all(e <= FP32_TOL for key, e in res.items() if key.startswith("err"))
    return res


def run_partial_grads_check(torch, A):
    """Only some inputs need a gradient (a frozen projection upstream of q, say; dQ is then never
    computed): those asked for equal the reference's. create_graph=True raises."""
    g = torch.Generator().manual_seed(12)
    base = [torch.randn(2, 2, 21, 16, generator=g) for _ in range(3)]
    do = torch.randn(2, 2, 21, 16, generator=g)
    res = {"case": "partial_grads", "tol": FP32_TOL}
    for wanted in ((1, 2), (0,), (2,)):
        q, k, v = (t.clone().requires_grad_(i in wanted) for i, t in enumerate(base))
        out, ref = A.flash_attention(q, k, v, True), A.attention_reference(q, k, v, True)
        leaves = [(q, k, v)[i] for i in wanted]
        got, want = (torch.autograd.grad(t, leaves, do) for t in (out, ref))
        res[f"err_{'qkv'[wanted[0]]}{len(wanted)}"] = max((a - b).abs().max().item()
                                                         for a, b in zip((out, *got), (ref, *want)))
    # A gradient that is to be differentiated again is refused, not silently made constant (the
    # kernels have no second derivative)
    q, k, v = (t.clone().requires_grad_() for t in base)
    try:
        torch.autograd.grad(A.flash_attention(q, k, v, True).sum(), q, create_graph=True)
        res["double_backward"] = "not refused"
    except RuntimeError as e:
        res["double_backward"] = str(e).splitlines()[0][:120]
    res["ok"] = all(e <= FP32_TOL for key, e in res.items() if key.startswith("err")) and (
        "no double backward" in res["double_backward"])
    return res


def run_batch_slices_check(torch, A):
    """More batch*head rows than a grid's axis 1 holds (the limit lowered to 4 here): the launchers run
    the batch in slices, and output and gradients equal one launch's bit for bit (training and decode)."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(3, 2, 19, 16, generator=g, requires_grad=True) for _ in range(3))
    do = torch.randn(3, 2, 19, 16, generator=g)
    kpm = torch.ones(3, 19, dtype=torch.bool)
    kpm[1, :5] = False
    kpm[2] = False  # the last slice's one sequence sees no key

    def run():
        out = A.flash_attention(q, k, v, True, kpm)
        with torch.no_grad():
            dec = A.flash_attention(q[:, :, -1:].detach(), k.detach(), v.detach(), False, kpm)
        return (out, *torch.autograd.grad(out, (q, k, v), do), dec)
    whole = run()
    batches = []  # the batch size of every forward and backward launch, seen through the launchers
    saved = A.MAX_GRID_Y, A._flash_forward, A._flash_backward

    def counted(fn):  # the first argument (q, or dO for the backward) has the launch's batch size
        return lambda *args: batches.append(args[0].shape[0]) or fn(*args)
    A.MAX_GRID_Y = 4  # B*H = 6: slices of 2 sequences and of 1
    A._flash_forward, A._flash_backward = counted(saved[1]), counted(saved[2])
    try:
        sliced = run()
    finally:
        A.MAX_GRID_Y, A._flash_forward, A._flash_backward = saved
    ref = A.attention_reference(q, k, v, True, kpm)
    res = {"case": "batch_slices", "launch_batches": batches,
           "equal": all(torch.equal(a, b) for a, b in zip(whole, sliced)),
           "out_err": (sliced[0] - ref).abs().max().item(), "tol": FP32_TOL}
    # forward, backward and decode: each called with the whole batch, then once per slice
    res["ok"] = batches == [3, 2, 1] * 3 and res["equal"] and res["out_err"] <= FP32_TOL
    return res


def gpu_launch_configs(A):
    """(label, head dim, {kernel: (BLOCK_M, BLOCK_N, warps, stages)}) for every launch configuration the
    GPU may use, as attention._configs picks them (for 16-bit inputs, and for fp32 with TF32 and with
    exact dots): entry i of the fwd, dK/dV and dQ lists of a head dim together (a shorter list repeats
    its first entry). Block shapes already listed at another head dim are not listed again: the head
    dim sets the width of every tile, not which blocks a program visits or masks."""
    saved = A.INTERPRET, os.environ.pop("MAGMA_FLASH_AUTOTUNE", None)
    A.INTERPRET = False  # what _configs returns on a GPU: every candidate
    try:
        rows, seen = [], set()
        for d in sorted(A.FWD_CONFIGS):
            for precision in (None, "tf32", "ieee"):
                lists = {name: A._configs(name, d, precision) for name in ("fwd", "dkdv", "dq")}
                for i in range(max(map(len, lists.values()))):
                    configs = {name: c[i] if i < len(c) else c[0] for name, c in lists.items()}
                    key = tuple(configs[name][:2] for name in ("fwd", "dkdv", "dq"))
                    if key not in seen:
                        seen.add(key)
                        rows.append((f"d{d}_{precision or '16bit'}_{i}", d, configs))
    finally:
        A.INTERPRET = saved[0]
        if saved[1] is not None:
            os.environ["MAGMA_FLASH_AUTOTUNE"] = saved[1]
    return rows


def block_shape_errors(torch, A, D, span, seed):
    """(shape, max abs error of the output and the three gradients against the reference) at lengths of
    a few blocks of `span` plus a ragged end, with the launch configs A.INTERPRET_CONFIGS holds now."""
    T = span + 37
    g = torch.Generator().manual_seed(seed)
    # (B, Tq, Tk, causal, pads): with pads, the second sequence of two starts with that many
    shapes = [(2, T, T, True, 40),         # causal, left-padded: full, diagonal, skipped, ragged
              (1, 37, T, True, None),      # a prefill: fewer queries than keys, no mask at all
              (1, T, 37, True, None),      # more queries than keys: the first rows see none
              (2, T - 29, T, False, 40)]   # no causal mask (the ViT), padded
    for B, Tq, Tk, causal, pads in shapes:
        q = torch.randn(B, 1, Tq, D, generator=g, requires_grad=True)
        k, v = (torch.randn(B, 1, Tk, D, generator=g, requires_grad=True) for _ in range(2))
        do = torch.randn(B, 1, Tq, D, generator=g)
        kpm = None
        if pads is not None:
            kpm = torch.ones(B, Tk, dtype=torch.bool)
            kpm[B - 1, :pads] = False
        out = A.flash_attention(q, k, v, causal, kpm)
        ref = A.attention_reference(q, k, v, causal, kpm)
        got, want = (torch.autograd.grad(t, (q, k, v), do) for t in (out, ref))
        yield f"Tq={Tq} Tk={Tk} causal={causal}", max((a - b).abs().max().item()
                                                    for a, b in zip((out, *got), (ref, *want)))


def run_fused_backward_check(torch, A):
    """MAGMA_FLASH_BACKWARD=fused, the one-kernel backward: every case above, then every block shape of
    FUSED_BWD_CONFIGS (the GPU's candidates) at lengths of a few of its blocks, against the reference."""
    res = {"case": "fused_backward", "tol": FP32_TOL, "runs": 0, "failed": []}
    saved = os.environ.get("MAGMA_FLASH_BACKWARD"), A.INTERPRET_CONFIGS
    os.environ["MAGMA_FLASH_BACKWARD"] = "fused"
    worst = 0.0
    try:
        for name in CASES:
            case = run_case(name, torch, A)
            res["runs"] += 1
            if not case["ok"]:
                res["failed"].append(json.dumps(case))
        blocks = sorted({c[:2] for configs in A.FUSED_BWD_CONFIGS.values() for c in configs})
        for row, (m, n) in enumerate(blocks):
            A.INTERPRET_CONFIGS = {**saved[1], "fused": (m, n, 4, 1)}
            for shape, err in block_shape_errors(torch, A, 32, max(m, n), seed=row):
                worst = max(worst, err)
                res["runs"] += 1
                if not err <= FP32_TOL:
                    res["failed"].append(f"fused {m}x{n} {shape}: {err:.2e}")
    finally:
        A.INTERPRET_CONFIGS = saved[1]
        if saved[0] is None:
            os.environ.pop("MAGMA_FLASH_BACKWARD")
        else:
            os.environ["MAGMA_FLASH_BACKWARD"] = saved[0]
    res["max_err"] = worst
    res["ok"] = not res["failed"] and res["runs"] > 0
    return res


def run_gpu_configs_check(torch, A):
    """The interpreter's own small blocks stand in for the GPU's everywhere else; here every launch
    configuration the GPU may pick (the autotuner's candidates, the fp32 ones, the decode block of each
    head dim) runs instead, at lengths of a few of its blocks plus a ragged end: causal with left
    padding, a causal prefill shorter than the keys, and a padded full mask. fp32, against the
    reference (forward and the three gradients), as in the cases above. Warps and stages do not
    change what the interpreter computes, so only the block shapes are checked."""
    res = {"case": "gpu_launch_configs", "tol": FP32_TOL, "runs": 0, "failed": []}
    worst = 0.0
    saved = A.INTERPRET_CONFIGS, A.INTERPRET_DECODE_BLOCK_N
    try:
        for row, (label, D, configs) in enumerate(gpu_launch_configs(A)):
            A.INTERPRET_CONFIGS = configs
            span = max(max(c[0], c[1]) for c in configs.values())  # the longest block of any kernel
            for shape, err in block_shape_errors(torch, A, D, span, seed=row):
                worst = max(worst, err)
                res["runs"] += 1
                if not err <= FP32_TOL:
                    res["failed"].append(f"{label} {shape}: {err:.2e}")
        decode_blocks = {(d, table[d][0]) for table in (A.DECODE_CONFIGS, A.DECODE_CONFIGS_TF32,
                                                         A.DECODE_CONFIGS_IEEE) for d in table}
        for d, block_n in sorted(decode_blocks):  # one query against 2.5 blocks, 1 and 3 splits
            A.INTERPRET_DECODE_BLOCK_N = block_n
            g = torch.Generator().manual_seed(d)
            Tk = 2 * block_n + block_n // 2 + 3
            q = torch.randn(2, 2, 1, d, generator=g)
            k, v = (torch.randn(2, 2, Tk, d, generator=g) for _ in range(2))
            kpm = torch.ones(2, Tk, dtype=torch.bool)
            kpm[1, :block_n + 5] = False
            ref = A.attention_reference(q, k, v, False, kpm)
            for splits in (1, 3):
                err = (A.flash_decode(q, k, v, kpm, num_splits=splits) - ref).abs().max().item()
                worst = max(worst, err)
                res["runs"] += 1
                if not err <= FP32_TOL:
                    res["failed"].append(f"decode d{d} block_n={block_n} splits={splits}: {err:.2e}")
    finally:
        A.INTERPRET_CONFIGS, A.INTERPRET_DECODE_BLOCK_N = saved
    res["max_err"] = worst
    res["ok"] = not res["failed"] and res["runs"] > 0
    return res


def run_auto_backward_check(torch, A):
    """MAGMA_FLASH_BACKWARD=auto (the default is split): where auto may choose, the first backward of a
    shape class times both backwards and keeps the faster; its gradients are then that backward's, bit
    for bit, and later calls of the class reuse the choice without timing again; where it may not
    (autotuning off), the two-kernel backward runs even for a class already timed. Timing is stubbed
    here (the interpreter has no GPU clock): each backward really runs, and the stub says which won."""
    res = {"case": "auto_backward", "failed": []}
    saved = A._can_time_backwards, A._time_backward_ms, dict(A.BACKWARD_CHOICES), os.environ.get("MAGMA_FLASH_BACKWARD")
    timed = []

    def stub_time(run):  # split is timed first, then fused; the class's name says which one "wins"
        run()
        timed.append(len(timed) % 2)
        return {"fused_wins": (2.0, 1.0), "split_wins": (1.0, 2.0)}[winner][timed[-1]]

    def grads(backward, q, k, v, do, kpm):
        os.environ["MAGMA_FLASH_BACKWARD"] = backward
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(A.flash_attention(*inputs, True, kpm), inputs, do)

    try:
        A.BACKWARD_CHOICES.clear()
        os.environ.pop("MAGMA_FLASH_BACKWARD", None)
        res["default"] = A._backward_kind()
        # where nothing can be timed (the CPU here): the two-kernel backward, and no choice is kept
        q, k, v, do, kpm = make_inputs(torch, 2, 2, 37, 37, 32, "left_pad", "float32", "contiguous", seed=3)
        if not all(torch.equal(a, b) for a, b in zip(grads("auto", q, k, v, do, kpm), grads("split", q, k, v, do, kpm))):
            res["failed"].append("untimed auto is not the two-kernel backward")
        if A.BACKWARD_CHOICES:
            res["failed"].append(f"untimed auto kept a choice: {A.BACKWARD_CHOICES}")
        A._can_time_backwards, A._time_backward_ms = (lambda q: True), stub_time
        inputs = {}
        for winner, T in (("fused_wins", 37), ("split_wins", 70)):  # two shape classes (64 and 128 tokens)
            q, k, v, do, kpm = inputs[winner] = make_inputs(torch, 2, 2, T, T, 32, "left_pad", "float32",
                                                            "contiguous", seed=T)
            before = len(timed)
            first = grads("auto", q, k, v, do, kpm)
            again = grads("auto", q, k, v, do, kpm)
            want = grads(winner.split("_")[0], q, k, v, do, kpm)
            other = grads({"fused_wins": "split", "split_wins": "fused"}[winner], q, k, v, do, kpm)
            if len(timed) - before != 2:
                res["failed"].append(f"{winner}: {len(timed) - before} backwards timed, not 2 (once each)")
            if not all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, want)):
                res["failed"].append(f"{winner}: auto's gradients are not the faster backward's")
            if all(torch.equal(a, b) for a, b in zip(want, other)):
                res["failed"].append(f"{winner}: the two backwards agree bit for bit: the check proves nothing")
        res["choices"] = sorted(v for v in A.BACKWARD_CHOICES.values())
        if res["choices"] != ["fused", "split"]:
            res["failed"].append(f"kept {res['choices']}, not one choice per shape class")
        A._can_time_backwards = lambda q: False  # e.g. MAGMA_FLASH_AUTOTUNE=0: pinned, whatever was timed
        q, k, v, do, kpm = inputs["fused_wins"]
        if not all(torch.equal(a, b) for a, b in zip(grads("auto", q, k, v, do, kpm), grads("split", q, k, v, do, kpm))):
            res["failed"].append("auto with autotuning off is not the two-kernel backward")
    finally:
        A._can_time_backwards, A._time_backward_ms = saved[0], saved[1]
        A.BACKWARD_CHOICES.clear()
        A.BACKWARD_CHOICES.update(saved[2])
        if saved[3] is None:
            os.environ.pop("MAGMA_FLASH_BACKWARD", None)
        else:
            os.environ["MAGMA_FLASH_BACKWARD"] = saved[3]
    res["ok"] = res["default"] == "split" and not res["failed"]
    return res


EXTRA_CHECKS = {"decode_split_k_merge": run_decode_split_check, "autotune_launcher": run_autotune_check,
                "torch_compile_one_opaque_op": run_compile_check, "custom_scale": run_scale_check,
                "batch_slices": run_batch_slices_check, "partial_grads": run_partial_grads_check,
                "gpu_launch_configs": run_gpu_configs_check, "fused_backward": run_fused_backward_check,
                "auto_backward": run_auto_backward_check}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the per-case results to this file")
    parser.add_argument("--only", nargs="*", help="run only these case names")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by attention)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch
    import attention as A
    if not A.INTERPRET:
        raise SystemExit("triton was imported before TRITON_INTERPRET=1 could take effect")
    if A.TRITON_IMPORT_ERROR is not None:
        raise SystemExit(f"triton is not importable: {A.TRITON_IMPORT_ERROR}")
    names = args.only or list(CASES) + list(EXTRA_CHECKS)
    results = []
    for name in names:
        res = EXTRA_CHECKS[name](torch, A) if name in EXTRA_CHECKS else run_case(name, torch, A)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
