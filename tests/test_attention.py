"""Tests for attention.py: the semantics (reference, SDPA, dispatcher) on CPU, the Triton kernel on
CPU under TRITON_INTERPRET=1 (in a subprocess), the kernel on a GPU in bf16/fp16 (skipped without
CUDA), and that bench.py runs."""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

import attention as A

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
import attention_interpret_check as icheck  # noqa: E402  (plain data and functions; imports no triton)


def rand(*shape, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=device, dtype=dtype)


def loop_attention(q, k, v, causal, key_padding_mask):
    """Attention one query row at a time, written from the definition (bottom-right causal)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(Tq):
            keys = [j for j in range(Tk)
                    if (not causal or j <= i + Tk - Tq)
                    and (key_padding_mask is None or bool(key_padding_mask[b, j]))]
            for h in range(H):
                if keys:
                    s = k[b, h, keys] @ q[b, h, i] / math.sqrt(D)  # (n,)
                    out[b, h, i] = torch.softmax(s, 0) @ v[b, h, keys]
    return out


# ------------------------------------------------------------------------------------------------
# (a) Semantics on CPU: reference, SDPA path, dispatcher
# ------------------------------------------------------------------------------------------------

MASK_CASES = [  # Tq, Tk, causal, padding
    (7, 7, True, False),
    (3, 9, True, False),     # KV-cache prefill: the 3 queries are the last 3 positions
    (1, 9, True, True),      # one-token decode with a left-padded batch
    (6, 6, False, True),
    (9, 4, True, False),     # more queries than keys: the first 5 rows see nothing
    (5, 8, True, True),
]


def padding(B, Tk):
    kpm = torch.ones(B, Tk, dtype=torch.bool)
    kpm[0, :2] = False  # left padding
    kpm[1, :] = False   # a sequence with no real key
    return kpm


@pytest.mark.parametrize("Tq,Tk,causal,pad", MASK_CASES)
def test_reference_and_sdpa_match_definition(Tq, Tk, causal, pad):
    q, k, v = rand(3, 2, Tq, 8, seed=1), rand(3, 2, Tk, 8, seed=2), rand(3, 2, Tk, 8, seed=3)
    kpm = padding(3, Tk) if pad else None
    want = loop_attention(q, k, v, causal, kpm)
    ref = A.attention_reference(q, k, v, causal, kpm)
    out = A.sdpa(q, k, v, causal, kpm)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    assert (ref - want).abs().max() < 1e-5
    assert (out - want).abs().max() < 1e-5


@pytest.mark.parametrize("causal,pad", [(False, False), (True, False), (True, True)])
def test_scale_is_the_softmax_temperature(causal, pad):
    """scale=s is softmax(s q.k): the same as the default 1/sqrt(D) applied to q rescaled by s*sqrt(D)."""
    q, k, v = rand(3, 2, 6, 8, seed=13), rand(3, 2, 6, 8, seed=14), rand(3, 2, 6, 8, seed=15)
    kpm = padding(3, 6) if pad else None
    for scale in (0.05, 2.0):
        want = loop_attention(q * scale * math.sqrt(8), k, v, causal, kpm)
        for impl in ("reference", "sdpa"):
            assert (A.attention(q, k, v, causal, kpm, scale=scale, impl=impl) - want).abs().max() < 1e-5, impl


def test_bottom_right_causal_is_the_kv_cache_mask():
    # Attending with the last Tq queries against all Tk keys must equal the last Tq rows of full
    # causal attention: exactly what a KV cache computes.
    q, k, v = rand(1, 2, 10, 8, seed=4), rand(1, 2, 10, 8, seed=5), rand(1, 2, 10, 8, seed=6)
    full = A.attention_reference(q, k, v, causal=True)
    for impl in ("reference", "sdpa"):
        last = A.attention(q[:, :, 7:], k, v, causal=True, impl=impl)
        assert (last - full[:, :, 7:]).abs().max() < 1e-6, impl


ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),  # SDPA's CUDA backends differ from CPU's
                                          pytest.param("cuda", torch.float32, marks=ON_CUDA, id="cuda-fp32"),
                                          pytest.param("cuda", torch.bfloat16, marks=ON_CUDA, id="cuda-bf16")])
def test_fully_masked_row_is_zero_with_zero_grad(device, dtype):
    q, k, v = (rand(2, 2, 4, 8, seed=s, device=device).to(dtype).requires_grad_() for s in (7, 8, 9))
    kpm = torch.tensor([[True] * 4, [False] * 4], device=device)
    impls = ("reference", "sdpa") + (("triton",) if device == "cuda" and A.TRITON_IMPORT_ERROR is None else ())
    for impl in impls:  # (the kernel on CPU: the interpreter cases)
        out = A.attention(q, k, v, key_padding_mask=kpm, impl=impl)
        assert torch.equal(out[1], torch.zeros_like(out[1])), impl
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv)), impl
        assert all(torch.equal(g[1], torch.zeros_like(g[1])) for g in (dq, dk, dv)), impl


def test_dispatcher_forcing(monkeypatch):
    q, k, v = rand(1, 2, 5, 8, seed=10), rand(1, 2, 5, 8, seed=11), rand(1, 2, 5, 8, seed=12)
    calls = []
    monkeypatch.setattr(A, "attention_reference", lambda *a: calls.append("reference") or a[0])
    monkeypatch.setattr(A, "sdpa", lambda *a: calls.append("sdpa") or a[0])
    monkeypatch.setattr(A, "flash_attention", lambda *a: calls.append("triton") or a[0])
    monkeypatch.delenv("MAGMA_ATTENTION", raising=False)
    A.attention(q, k, v, impl="reference")
    A.attention(q, k, v, impl="sdpa")
    A.attention(q, k, v, impl="triton")
    A.attention(q, k, v)  # auto on CPU tensors: SDPA
    monkeypatch.setenv("MAGMA_ATTENTION", "reference")
    A.attention(q, k, v)
    A.attention(q, k, v, impl="sdpa")  # the argument wins over the environment
    assert calls == ["reference", "sdpa", "triton", "sdpa", "reference", "sdpa"]


def test_auto_uses_triton_only_where_it_can(monkeypatch):
    q = rand(1, 1, 2, 8)
    assert not A._flash_supported(q, q, q)  # CPU tensor
    monkeypatch.setattr(A, "TRITON_IMPORT_ERROR", ImportError("no module named triton"))
    with pytest.raises(RuntimeError, match="Triton"):
        A.flash_attention(q, q, q)
    assert torch.allclose(A.attention(q, q, q), A.attention_reference(q, q, q), atol=1e-6)  # falls back


def test_fp32_dot_precision_follows_torch_settings():
    """Exact fp32 dots unless PyTorch's matmuls may use TF32, set through the old or the new API (after
    the new one, torch.get_float32_matmul_precision() raises)."""
    old_global, old_cuda = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision
    old_new_global = torch.backends.fp32_precision
    try:
        assert A._precision(torch.bfloat16) == "tf32"  # Triton ignores it for 16-bit inputs
        torch.set_float32_matmul_precision("highest")
        assert A._precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert A._precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert A._precision(torch.float32) == "ieee"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert A._precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "none"  # inherit the global setting
        torch.backends.fp32_precision = "tf32"
        assert A._precision(torch.float32) == "tf32"
    finally:
        torch.backends.fp32_precision = old_new_global
        torch.backends.cuda.matmul.fp32_precision = old_cuda
        torch.set_float32_matmul_precision(old_global)
    assert torch.get_float32_matmul_precision() == old_global


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_dot_precision_before_pytorch_2_9(monkeypatch, allow_tf32):
    """PyTorch < 2.9 has no fp32_precision setting: allow_tf32 alone decides."""
    import types
    monkeypatch.setattr(torch.backends.cuda, "matmul", types.SimpleNamespace(allow_tf32=allow_tf32))
    assert A._precision(torch.float32) == ("tf32" if allow_tf32 else "ieee")


def test_bad_inputs_raise_clear_errors(monkeypatch):
    q, k = rand(1, 2, 5, 8), rand(1, 2, 6, 8)
    with pytest.raises(ValueError, match="'flash'"):
        A.attention(q, k, k, impl="flash")
    monkeypatch.setenv("MAGMA_ATTENTION", "fast")
    with pytest.raises(ValueError, match="MAGMA_ATTENTION"):
        A.attention(q, k, k)
    monkeypatch.delenv("MAGMA_ATTENTION")
    monkeypatch.setenv("MAGMA_FLASH_BACKWARD", "atomic")
    with pytest.raises(ValueError, match=r"MAGMA_FLASH_BACKWARD='atomic'; choose one of \('split', 'fused', 'auto'\)"):
        A._backward_kind()
    monkeypatch.delenv("MAGMA_FLASH_BACKWARD")
    with pytest.raises(ValueError, match="k "):
        A.attention(q, rand(1, 2, 6, 4), rand(1, 2, 6, 4))
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.attention(q, k, k, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    if A.TRITON_IMPORT_ERROR is None:
        with pytest.raises(ValueError, match="float64"):
            A.flash_attention(q.double(), k.double(), k.double())
        with pytest.raises(ValueError, match="num_splits must be None .* got 0"):
            A.flash_decode(q[:, :, :1], k, k, num_splits=0)
        with monkeypatch.context() as m:  # more heads than a grid axis holds: not split, refused
            m.setattr(A, "MAX_GRID_Y", 1)
            with pytest.raises(ValueError, match="up to 1 heads; q has 2"):
                A.flash_attention(q, k, k)
            fake = types.SimpleNamespace(is_cuda=True, shape=(1, 2, 5, 8), dtype=torch.float16)  # a CUDA q
            assert not A._flash_supported(fake, fake, fake)
        assert A._flash_supported(fake, fake, fake)
        with torch.no_grad():  # no key: zeros, and lse2 stays fp32 whatever the default dtype
            torch.set_default_dtype(torch.float64)
            try:
                o, lse2 = A._flash_forward(q, k[:, :, :0], k[:, :, :0], False, q, 0, 1.0)
            finally:
                torch.set_default_dtype(torch.float32)
        assert torch.equal(o, torch.zeros_like(q)) and lse2.dtype == torch.float32 and (lse2 == math.inf).all()
        if not A.INTERPRET:
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                A.flash_attention(q, k, k)


# ------------------------------------------------------------------------------------------------
# (b) The Triton kernel under the interpreter, in a subprocess (TRITON_INTERPRET=1 must be set
#     before triton is imported). One run of the script checks every case; one test per case.
# ------------------------------------------------------------------------------------------------

INTERPRET_CASES = list(icheck.CASES) + list(icheck.EXTRA_CHECKS)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if A.TRITON_IMPORT_ERROR is not None:
        pytest.skip(f"triton not importable: {A.TRITON_IMPORT_ERROR}")
    out = tmp_path_factory.mktemp("interp") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "attention_interpret_check.py"),
                           "--json", str(out)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    if not out.exists():
        pytest.fail(f"interpreter check crashed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return {r["case"]: r for r in json.loads(out.read_text())}


@pytest.mark.parametrize("case", INTERPRET_CASES)
def test_triton_kernel_interpreted(interpreter_results, case):
    res = interpreter_results[case]
    assert res["ok"], json.dumps(res)


# ------------------------------------------------------------------------------------------------
# (c) On a GPU: low precision by FlashAttention's rule, determinism
# ------------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available() or A.TRITON_IMPORT_ERROR is not None,
                          reason="needs a CUDA GPU and triton")

GPU_SHAPES = [  # B, H, Tq, Tk, D, causal, padded
    (2, 3, 197, 197, 64, False, False),
    (2, 2, 300, 300, 128, True, False),
    (2, 2, 77, 300, 32, True, True),
    (3, 2, 1, 1000, 128, True, True),
    (1, 2, 256, 256, 16, True, False),
]


def gpu_inputs(shape, dtype):
    """q, k, v, dO of a GPU_SHAPES row on the GPU, and its key padding mask: batch 0 left-padded by a
    third, the last batch row with no key at all (None when the row is not padded)."""
    B, H, Tq, Tk, D, causal, padded = shape
    q, k, v = (rand(B, H, T, D, device="cuda", seed=s).to(dtype) for s, T in ((1, Tq), (2, Tk), (3, Tk)))
    do = rand(B, H, Tq, D, device="cuda", seed=4).to(dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, Tk, dtype=torch.bool, device="cuda")
        kpm[0, :Tk // 3] = False
        kpm[-1, :] = False
    return q, k, v, do, kpm


def grads_of(fn, q, k, v, do):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), do))


@cuda
@pytest.mark.parametrize("backward", ["split", "fused"])  # (auto runs one of them: tested below)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_low_precision_within_twice_torch_error(shape, dtype, backward, monkeypatch):
    monkeypatch.setenv("MAGMA_FLASH_BACKWARD", backward)
    causal = shape[5]
    q, k, v, do, kpm = gpu_inputs(shape, dtype)
    f32 = [t.float() for t in (q, k, v)]
    want = grads_of(lambda *a: A.attention_reference(*a, causal, kpm), *f32, do.float())
    ours = grads_of(lambda *a: A.flash_attention(*a, causal, kpm), q, k, v, do)
    naive = grads_of(lambda *a: icheck.naive_low_precision(torch, *a, causal, kpm, A), q, k, v, do)
    for name, o, n, w in zip(("out", "dq", "dk", "dv"), ours, naive, want):
        assert torch.isfinite(o).all(), name
        err, torch_err = (o.float() - w).abs().max().item(), (n.float() - w).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, f"{name}: kernel {err:.3g} vs plain torch {torch_err:.3g}"


@cuda
@pytest.mark.parametrize("backward", ["split", "fused"])  # (auto runs one of them: tested below)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[2]])
def test_gpu_deterministic(shape, dtype, backward, monkeypatch):
    """Bit-identical results twice, with either backward (the fused one adds dQ by atomics, all from
    one program per head, in a fixed order)."""
    monkeypatch.setenv("MAGMA_FLASH_BACKWARD", backward)
    causal = shape[5]
    q, k, v, do, kpm = gpu_inputs(shape, dtype)
    first = grads_of(lambda *a: A.flash_attention(*a, causal, kpm), q, k, v, do)
    second = grads_of(lambda *a: A.flash_attention(*a, causal, kpm), q, k, v, do)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@cuda
def test_gpu_auto_backward_times_each_shape_class_once(monkeypatch):
    """MAGMA_FLASH_BACKWARD=auto on a GPU: the first backward of a shape class times both backwards
    (triton.testing.do_bench) and keeps one, whose gradients auto then returns bit for bit; the next
    call of the class reuses it without timing. (Autotuning off, so that only the first configs compile,
    with auto allowed to choose all the same; tests/attention_interpret_check.py checks the choice.)"""
    monkeypatch.setenv("MAGMA_FLASH_BACKWARD", "auto")
    monkeypatch.setenv("MAGMA_FLASH_AUTOTUNE", "0")
    monkeypatch.setattr(A, "_can_time_backwards", lambda q: q.is_cuda)
    monkeypatch.setattr(A, "BACKWARD_CHOICES", {})
    timed, time_ms = [], A._time_backward_ms
    monkeypatch.setattr(A, "_time_backward_ms", lambda run: timed.append(run) or time_ms(run))
    q, k, v, do, _ = gpu_inputs(GPU_SHAPES[0], torch.bfloat16)
    first = grads_of(lambda *a: A.flash_attention(*a), q, k, v, do)
    (chosen,) = A.BACKWARD_CHOICES.values()
    again = grads_of(lambda *a: A.flash_attention(*a), q, k, v, do)
    monkeypatch.setenv("MAGMA_FLASH_BACKWARD", chosen)
    forced = grads_of(lambda *a: A.flash_attention(*a), q, k, v, do)
    assert chosen in ("split", "fused") and len(A.BACKWARD_CHOICES) == 1 and len(timed) == 2
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(first, again, forced))


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_model_strides_give_the_same_result(dtype):
    """The models pass q, k, v as (B, T, H, D) views transposed to (B, H, T, D), k and v interleaved in
    one fused projection: the kernel reads those strides and computes the same numbers bit for bit."""
    B, T, H, D = 2, 150, 3, 64
    qkv = rand(B, T, 3, H, D, device="cuda", seed=5).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), not contiguous
    do = rand(B, T, H, D, device="cuda", seed=6).to(dtype).transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, do))
    strided = grads_of(lambda *a: A.flash_attention(*a, causal=True), q, k, v, do)
    dense = grads_of(lambda *a: A.flash_attention(*a, causal=True), *(t.contiguous() for t in (q, k, v, do)))
    assert all(torch.equal(a, b) for a, b in zip(strided, dense))


@cuda
def test_gpu_fp32_and_dispatcher(monkeypatch):
    # exact fp32 matmuls whatever an earlier test (e.g. train.py's TF32 setting) left behind
    monkeypatch.setattr(torch.backends.cuda.matmul, "fp32_precision", "ieee")
    q, k, v = (rand(2, 2, 130, 64, device="cuda", seed=s) for s in (1, 2, 3))
    calls, kernel = [], A.flash_attention
    monkeypatch.setattr(A, "flash_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    out = A.attention(q, k, v, causal=True)  # auto on CUDA: the kernel
    assert calls == [1] and (out - A.attention_reference(q, k, v, causal=True)).abs().max() < 1e-4
    assert (A.flash_decode(q[:, :, -1:], k, v, num_splits=4)
            - A.attention_reference(q[:, :, -1:], k, v)).abs().max() < 1e-4
    # exact fp32 dots at D = 256 spill: "auto" takes SDPA there, the kernel still computes them
    q, k, v = (rand(1, 2, 40, 256, device="cuda", seed=s) for s in (1, 2, 3))
    assert A._precision(torch.float32) == "ieee" and not A._flash_supported(q, k, v)
    assert (A.attention(q, k, v) - A.attention_reference(q, k, v)).abs().max() < 1e-4 and calls == [1]
    assert (kernel(q, k, v) - A.attention_reference(q, k, v)).abs().max() < 1e-4


@cuda
def test_gpu_launches_never_wait_for_the_gpu():
    """Forward, backward and decode queue their kernels without a host-device synchronisation (a read
    of a GPU value, a blocking copy), which would stall the host once per layer of a model."""
    q, k, v, do, kpm = gpu_inputs(GPU_SHAPES[2], torch.bfloat16)  # causal, padded
    run = lambda: (grads_of(lambda *a: A.flash_attention(*a, True, kpm), q, k, v, do),
                   A.flash_attention(q[:, :, -1:], k, v, key_padding_mask=kpm))
    run()  # compiles the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_gpu_kernel_times_name_each_kernel():
    """bench.py's per-kernel GPU times (torch.profiler) find the forward's kernel and the backward's three."""
    import bench
    q, k, v, do, _ = gpu_inputs(GPU_SHAPES[0], torch.bfloat16)
    o, lse2 = A._flash_forward(q, k, v, False, q, 0, 0.125)
    times = bench.kernel_times_us(lambda: A._flash_forward(q, k, v, False, q, 0, 0.125))
    assert list(times) == ["_fwd_kernel"] and times["_fwd_kernel"] > 0
    times = bench.kernel_times_us(lambda: A._flash_backward(do, q, k, v, o, lse2, False, q, 0, 0.125))
    assert list(times) == ["_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"], times


@cuda
def test_gpu_more_rows_than_one_grid():
    """B*H past CUDA's 65535 limit on grid axis 1: the launchers run the batch in slices."""
    B, H = A.MAX_GRID_Y // 16 + 3, 16
    q, k, v = (rand(B, H, 9, 16, device="cuda", seed=s).half() for s in (1, 2, 3))
    do = rand(B, H, 9, 16, device="cuda", seed=4).half()
    ours = grads_of(lambda *a: A.flash_attention(*a, causal=True), q, k, v, do)
    want = grads_of(lambda *a: A.attention_reference(*a, causal=True), q.float(), k.float(), v.float(), do.float())
    for name, o, w in zip(("out", "dq", "dk", "dv"), ours, want):
        assert (o.float() - w).abs().max() < 2e-2, name
    decode = A.flash_decode(q[:, :, -1:], k, v)
    assert (decode.float() - A.attention_reference(q[:, :, -1:].float(), k.float(), v.float())).abs().max() < 1e-2


# ------------------------------------------------------------------------------------------------
# bench.py runs (speed itself is never asserted)
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU paths")
def test_bench_without_gpu(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    bench = os.path.join(ROOT, "bench.py")
    proc = subprocess.run([sys.executable, bench, "attention"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "no CUDA GPU" in proc.stderr
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, bench, "attention", "--cpu-smoke", "--shapes", "vit-tiny,decode-tiny",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert {"device", "torch", "triton"} <= set(payload["environment"])
    rows = {(r["shape"], r["impl"]): r for r in payload["rows"]}
    assert rows[("vit-tiny", "reference")]["fwd_tflops"] > 0 and rows[("vit-tiny", "reference")]["fwdbwd_ms"] > 0
    if A.TRITON_IMPORT_ERROR is None:
        assert rows[("vit-tiny", "triton")]["fwdbwd_ms"] > 0 and rows[("vit-tiny", "triton")]["bwd_ms"] > 0
        assert rows[("vit-tiny", "triton-fusedbwd")]["bwd_ms"] > 0 and ("decode-tiny", "triton-fusedbwd") not in rows
        assert rows[("decode-tiny", "triton-1split")]["fwd_us"] > 0
    assert rows[("vit-tiny", "sdpa-cudnn")]["note"].startswith("n/a")


# ------------------------------------------------------------------------------------------------
# The offline compile check (tests/attention_ptxas_check.py) still runs: two decode kernels, ~2 s
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(A.TRITON_IMPORT_ERROR is not None, reason="needs triton")
def test_ptxas_check_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TMPDIR=str(tmp_path))  # not ~/.triton, not /tmp
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "attention_ptxas_check.py"), "--head-dims", "64",
                           "--kernels", "decode"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("D64")]
    assert len(lines) == 2 and all("registers, spill" in l for l in lines), proc.stdout
