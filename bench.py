"""Measured speed, against the alternatives a user would pick. One subcommand per benchmark:

    python bench.py attention [--dtype bf16] [--json out.json]   # the fused kernel vs SDPA backends
    python bench.py attention --cpu-smoke                          # tiny CPU shapes: does the script run?
    python bench.py train [--json train.json]      # MAGMA training step vs the transformers assembly
    python bench.py generate [--json gen.json]     # greedy decoding, batch 1 and 32, vs transformers' generate
    python bench.py big [--json big.json]          # GPT-J-sized LM + ViT-L/14 at the largest batch that fits
    python bench.py all [--json-dir bench_results] # the four above in turn, each JSON saved as it ends
    (each of them also takes --cpu-smoke)

Each subcommand is one function `bench_<name>(args)` returning a payload {"rows": [...], "columns":
[...]}; main() adds the environment (device, torch, triton), prints the rows as a table and writes
them as JSON. Timings are CUDA events around calls run back to back (the median over up to 5
groups) after a warmup, which also absorbs Triton's compilation and autotuning. Nothing here is
asserted: speed is reported, never tested.
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, replace

import torch
import torch.nn as nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------
# Shared: timing, environment, table, JSON
# ------------------------------------------------------------------------------------------------

# The rows the running benchmark has measured so far (each bench_* function fills the list new_rows()
# gives it), its payload fields known before the first row (shape, FLOP counts, columns) and the
# function that adds the comparison columns: main() still prints and saves all of it when the run is
# interrupted (Ctrl-C, or the time limit of `bench.py all --timeout-each`), so a run cut short keeps
# what it measured, with its header and its ratios.
_ROWS = []
_HEADER = {}
_FINISH = None


def new_rows(header=None, finish=None):
    global _ROWS, _HEADER, _FINISH
    _ROWS, _HEADER, _FINISH = [], dict(header or {}), finish
    return _ROWS


def time_ms(fn, warmup, iters, cuda):
    """Median wall time of one fn() call in milliseconds.

    On a GPU the calls run back to back between two CUDA events, in up to 5 groups, and the median of
    the groups' means is returned: the host queues the next call while the GPU runs this one, as in a
    real model. (A sync after every call would leave the GPU idle while the next call's Python runs,
    and charge a 30 us kernel for ~100 us of host work.) A group lasts at least ~2 ms, so that the
    launch of its first call, which the GPU waits for, is spread over many calls of a short kernel.
    On a CPU: perf_counter around each call.
    """
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()  # one call on its own, to size the groups
        torch.cuda.synchronize()
        once_ms = (time.perf_counter() - t0) * 1e3
        groups = max(1, min(5, iters))
        per_group = max(1, iters // groups, min(1000, math.ceil(2.0 / max(once_ms, 1e-3))))
        for _ in range(groups):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_group):
                fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / per_group)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment(cpu_smoke=False):
    """What the numbers were measured on (--cpu-smoke: the CPU, also on a machine with a GPU)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available() and not cpu_smoke
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
        "flash_autotune": os.environ.get("MAGMA_FLASH_AUTOTUNE", "1") != "0",  # attention.py's configs
    }


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def print_table(rows, columns):
    """Print rows (dicts) as an aligned text table with the given columns."""
    if not rows:
        print("(no rows)")
        return
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def check_json_path(command, path):
    """Before any benchmark runs: --json must name a file in an existing folder (else one clear line)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"bench.py {command}: --json {path} is a folder; give a file name, "
                         f"e.g. {os.path.join(path, command + '.json')}")
    if not os.path.isdir(folder):
        raise SystemExit(f"bench.py {command}: --json {path}: the folder {folder} does not exist")


def write_json(command, path, payload):
    """Write the results; a failure (disk full, folder removed meanwhile) is one line, the table is printed."""
    try:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
    except OSError as e:
        raise SystemExit(f"bench.py {command}: cannot write --json {path} ({e.strerror or e}); "
                         f"the results are in the table above") from None
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# bench.py attention
# ------------------------------------------------------------------------------------------------

# name, B, H, Tq, Tk, D, causal (the shapes the models run: issue 3). Issue 3's "gptj" row has head
# dim 128; GPT-J 6B itself has 16 heads of 256 (what `bench.py big` runs), hence "gptj-d256".
ATTENTION_SHAPES = [
    ("gpt2", 8, 12, 1024, 1024, 64, True),
    ("gptj", 4, 16, 2048, 2048, 128, True),
    ("gptj-d256", 4, 16, 2048, 2048, 256, True),
    ("vit-b16", 64, 12, 197, 197, 64, False),
    ("vit-l14-336", 16, 16, 577, 577, 64, False),
    ("long", 2, 16, 8192, 8192, 64, True),
    ("decode", 16, 16, 1, 4096, 128, False),  # one new token against a 4096-token cache
]
SMOKE_SHAPES = [
    ("gpt2-tiny", 1, 2, 40, 40, 16, True),
    ("vit-tiny", 2, 2, 19, 19, 32, False),
    ("decode-tiny", 2, 2, 1, 70, 32, False),
]


def attention_flops(B, H, Tq, Tk, D, causal):
    """Forward FLOPs: two matmuls of 2*Tq*Tk*D per head, half of them masked away when causal."""
    return 4 * B * H * Tq * Tk * D / (2 if causal else 1)


def sdpa_backend(backend_name):
    """SDPA with one backend forced; a backend that cannot take the inputs raises."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def pinned_backward(A, kind):
    """flash_attention with one backward forced: MAGMA_FLASH_BACKWARD=kind, read by the forward."""
    def run(q, k, v, causal):
        with environ(MAGMA_FLASH_BACKWARD=kind):
            return A.flash_attention(q, k, v, causal)
    return run


# bench.py attention's Triton rows: the backward each runs (MAGMA_FLASH_BACKWARD; None: the default, "split")
TRITON_BACKWARDS = {"triton": None, "triton-fusedbwd": "fused", "triton-autobwd": "auto"}


def attention_impls(A, decode):
    """name -> fn(q, k, v, causal) for every implementation compared."""
    impls = {"triton": lambda q, k, v, causal: A.flash_attention(q, k, v, causal)}
    if not decode:  # the one-kernel backward, and the faster of the two (timed once per shape class)
        impls["triton-fusedbwd"] = pinned_backward(A, "fused")
        impls["triton-autobwd"] = pinned_backward(A, "auto")
    if decode:  # is splitting the keys across programs worth it, and into how many? measure
        for n in (1, 4, 16):
            impls[f"triton-{n}split"] = lambda q, k, v, causal, n=n: A.flash_decode(q, k, v, num_splits=n)
        impls["triton-blockkernel"] = lambda q, k, v, causal: A._flash_forward(
            q, k, v, causal, q, 0, 1.0 / math.sqrt(q.shape[-1]), decode_splits=0)[0]
    impls["sdpa-flash"] = sdpa_backend("FLASH_ATTENTION")
    impls["sdpa-cudnn"] = sdpa_backend("CUDNN_ATTENTION")
    impls["sdpa-efficient"] = sdpa_backend("EFFICIENT_ATTENTION")
    impls["reference"] = lambda q, k, v, causal: A.attention_reference(q, k, v, causal)
    return impls


def refusal(fn, q, k, v, causal):
    """None if fn runs on these inputs, else a short reason (SDPA explains itself in warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():
                fn(q, k, v, causal)
            return None
        except torch.cuda.OutOfMemoryError:
            return "out of memory"
        except Exception as e:  # a backend refusing, or a kernel that does not compile here
            # SDPA warns "<backend> not used because:" and then the reason; keep the reasons
            why = [str(w.message).strip().split("\n")[0] for w in caught]
            why = [w for w in why if w and not w.endswith("because:")]
            return "; ".join(why[:2]) or str(e).strip().split("\n")[0]


def kernel_times_us(fn, calls=5):
    """GPU microseconds per fn() call of each kernel it launches, from torch.profiler's CUDA events:
    {"_bwd_dkdv_kernel": 151.2, ...}, in launch order. A warm call first, so nothing compiles inside."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] = times.get(e.name, 0.0) + e.time_range.elapsed_us() / calls  # this launch
    return times


def triton_breakdown(A, q, k, v, do, causal, warmup, iters, cuda, backward="split"):
    """Where the Triton kernel's time goes: its forward and backward launchers on their own (no
    autograd), each timed called back to back and, on a GPU, replayed from a CUDA graph, which takes
    the host out (a launch costs tens of microseconds of Python): where the two differ, the host sets
    the pace, not the kernels. With autotuning on, also the config the autotuner chose for each kernel."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    with torch.no_grad():
        fwd = lambda: A._flash_forward(q, k, v, causal, q, 0, scale)  # kpm = q: no key padding mask
        o, lse2 = fwd()
        bwd = lambda: A._flash_backward(do, q, k, v, o, lse2, causal, q, 0, scale, backward=backward)
        times = {"bwd_ms": time_ms(bwd, warmup, iters, cuda)}
        if cuda:
            for name, fn in (("fwd_graph_ms", fwd), ("bwd_graph_ms", bwd)):
                side = torch.cuda.Stream()  # as torch.cuda.graph wants: a warm call off the default stream
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                times[name] = time_ms(graph.replay, warmup, iters, cuda)
                del graph
            kernels = {**kernel_times_us(fwd), **kernel_times_us(bwd)}
            times["kernel_us"] = ", ".join(f"{name.strip('_').removesuffix('_kernel')} {us:.0f}"
                                           for name, us in kernels.items())
    notes, ran = [], backward
    if backward == "auto":  # which one it ran: the one timed faster for this shape class, if timed
        ran = A.BACKWARD_CHOICES.get(A._backward_key(q, k, causal, False))
        notes.append(f"auto backward: {ran} (timed faster)" if ran else "auto backward: split (not timed)")
    kernels = ("fwd", "fused") if ran == "fused" else ("fwd", "dkdv", "dq")
    tuned = {name: config for name, config in A.tuned_configs(q.shape[-1]).items() if name in kernels}
    if tuned:
        notes.append("autotuned: " + ", ".join(f"{k} {v}" for k, v in tuned.items()))
    if notes:
        times["note"] = "; ".join(notes)
    return times


def bench_attention(args):
    """Forward and forward+backward TFLOP/s (decode: µs per call) for each shape and implementation."""
    cuda = torch.cuda.is_available() and not args.cpu_smoke  # --cpu-smoke runs on the CPU, GPU or not
    if not cuda and not args.cpu_smoke:
        raise SystemExit("bench.py attention: no CUDA GPU found. The timings are meant for a GPU; "
                         "run with --cpu-smoke to exercise the script on tiny CPU shapes "
                         "(set TRITON_INTERPRET=1 to include the Triton kernel).")
    import attention as A
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype] if cuda else torch.float32  # the interpreter mishandles bf16 dots
    shapes = ATTENTION_SHAPES if cuda else SMOKE_SHAPES
    if args.shapes:  # the names of this run's table: --cpu-smoke on a CPU has its own tiny shapes
        picked = pick_variants("bench.py attention", [s[0] for s in shapes], args.shapes, flag="--shapes")
        shapes = [s for s in shapes if s[0] in picked]
    every = list(dict.fromkeys([*attention_impls(A, decode=False), *attention_impls(A, decode=True)]))
    impls = pick_variants("bench.py attention", every, args.impls, flag="--impls")
    warmup, iters = (args.warmup, args.iters) if cuda else (0, 1)
    rows = new_rows({
        "benchmark": "attention", "dtype": str(dtype).replace("torch.", ""),
        "flops": "4*B*H*Tq*Tk*D forward, halved when causal; forward+backward = 3.5x forward (the backward "
                 "credited with the algorithm's 5 matmuls; the Triton kernel runs 7)",
        "breakdown": "triton rows: fwd_graph_ms, the forward launcher replayed from a CUDA graph (no host "
                     "time); bwd_ms, the backward launcher alone, called back to back; bwd_graph_ms, it "
                     "replayed from a CUDA graph; kernel_us, each kernel's GPU time per call (torch.profiler)",
        "columns": ["shape", "B,H,Tq,Tk,D", "causal", "impl", "fwd_ms", "fwd_tflops", "fwdbwd_ms",
                    "fwdbwd_tflops", "fwd_graph_ms", "bwd_ms", "bwd_graph_ms", "kernel_us", "fwd_us", "GB/s",
                    "note"]})
    for name, B, H, Tq, Tk, D, causal in shapes:
        decode = Tq == 1
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
                       for T in (Tq, Tk, Tk, Tq))
        flops = attention_flops(B, H, Tq, Tk, D, causal)
        for impl, fn in attention_impls(A, decode).items():
            if impl not in impls:
                continue
            row = {"shape": name, "B,H,Tq,Tk,D": f"{B},{H},{Tq},{Tk},{D}", "causal": causal, "impl": impl}
            rows.append(row)
            if impl.startswith("triton") and not (cuda or A.INTERPRET):
                row["note"] = "n/a: CPU tensors need TRITON_INTERPRET=1"
                continue
            if impl == "reference" and cuda:
                # fp32 score matrix, its masked and softmaxed copies, and the backward's: ~8 copies
                need = 8 * B * H * Tq * Tk * 4
                if need > 0.8 * torch.cuda.mem_get_info()[0]:
                    row["note"] = f"n/a: would need ~{need / 2**30:.0f} GiB"
                    continue
            reason = refusal(fn, q, k, v, causal)
            if reason is not None:
                row["note"] = f"n/a: {reason}"[:100]
                continue
            with torch.no_grad():
                ms = time_ms(lambda: fn(q, k, v, causal), warmup, iters, cuda)
            row["fwd_ms"] = ms
            if decode:
                row["fwd_us"] = ms * 1e3
                row["GB/s"] = 2 * B * H * Tk * D * q.element_size() / (ms * 1e-3) / 1e9  # reads K and V
                continue
            row["fwd_tflops"] = flops / (ms * 1e-3) / 1e12
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            try:
                ms = time_ms(lambda: torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), do),
                             warmup, iters, cuda)
            except Exception as e:  # e.g. out of memory in the reference's backward
                row["note"] = f"backward n/a: {str(e).splitlines()[0]}"[:100]
                continue
            row["fwdbwd_ms"] = ms
            row["fwdbwd_tflops"] = 3.5 * flops / (ms * 1e-3) / 1e12  # backward credited 2.5x forward
            if impl in TRITON_BACKWARDS:
                try:
                    row.update(triton_breakdown(A, q, k, v, do, causal, warmup, iters, cuda,
                                                backward=TRITON_BACKWARDS[impl] or A._backward_kind()))
                except Exception as e:  # a diagnostic: its failure must not cost the other rows
                    row["note"] = f"breakdown n/a: {str(e).splitlines()[0]}"[:100]
            if cuda:
                torch.cuda.empty_cache()
        print(f"  {name} done", file=sys.stderr, flush=True)
    return {**_HEADER, "rows": rows}


# ------------------------------------------------------------------------------------------------
# bench.py train / generate / big: MAGMA itself, against the same model assembled from transformers
# ------------------------------------------------------------------------------------------------
#
# A comparison is only fair if both sides compute the same function of the same weights on the same
# inputs. So the transformers side is built first (GPT2LMHeadModel + CLIPVisionModel, random weights,
# SDPA attention), written with save_pretrained to a temporary directory and read back by our own,
# tested loaders (GPT.from_pretrained, ViT.from_pretrained). Our Magma then adds its adapters and
# image prefix, and the transformers assembly gets copies of those very modules: adapters.add_adapters
# wraps its MLPs exactly as it wraps ours. tests/test_bench.py checks on a tiny config that the two
# assemblies give the same loss (fp32) and the same greedy tokens.

# name: (assembly, frozen LM weights, attention impl (ours: MAGMA_ATTENTION, or ATTENTION_ENV), mode)
# Every row runs under bf16 autocast; "lm_weights" is the dtype the frozen LM's weights are held in.
# mode: "eager"; "compile", torch.compile(model); "graph", the whole step (forward, backward, optimizer)
# recorded once as a CUDA graph and replayed, which takes the host's launch overhead out of the step.
TRAIN_VARIANTS = {
    "transformers": ("transformers", "fp32", "sdpa", "eager"),
    "transformers-bf16lm": ("transformers", "bf16", "sdpa", "eager"),
    "ours-fp32lm": ("ours", "fp32", "auto", "eager"),
    "ours-sdpa": ("ours", "bf16", "sdpa", "eager"),
    "ours-sdpa-torchce": ("ours", "bf16", "sdpa-torchce", "eager"),  # PyTorch's cross-entropy, not magma's kernels
    "ours": ("ours", "bf16", "auto", "eager"),
    "ours-sdpa-graph": ("ours", "bf16", "sdpa", "graph"),
    "ours-graph": ("ours", "bf16", "auto", "graph"),
    "ours-fusedbwd": ("ours", "bf16", "auto-fusedbwd", "eager"),  # the Triton kernel's one-kernel backward
    "ours-fusedbwd-graph": ("ours", "bf16", "auto-fusedbwd", "graph"),
    "ours-compile": ("ours", "bf16", "auto", "compile"),
    "ours-sdpa-compile": ("ours", "bf16", "sdpa", "compile"),  # in case the Triton kernel splits the graph
}
# name: (assembly, attention impl, decode step replayed as a CUDA graph (gpt.DecodeStep))
GENERATE_VARIANTS = {
    "transformers": ("transformers", "sdpa", False),
    "ours-eager": ("ours", "auto", False),
    "ours-sdpa-graph": ("ours", "sdpa", True),
    "ours": ("ours", "auto", True),
}


def bench_device(name, args):
    """cpu for --cpu-smoke, else cuda; without a GPU (and without --cpu-smoke) exit with one line."""
    if args.cpu_smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"bench.py {name}: no CUDA GPU found; the figures are meant for a GPU. "
                         f"Run `python bench.py {name} --cpu-smoke` to exercise the script on tiny CPU models.")
    return torch.device("cuda")


def int_at_least(minimum, what):
    """argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


positive_int = int_at_least(1, "a positive integer")
nonnegative_int = int_at_least(0, "an integer >= 0")  # --warmup 0: no warm-up


def positive_ints(text):
    """argparse type: comma-separated integers >= 1, e.g. "1,32"."""
    return tuple(positive_int(t) for t in text.split(","))


def pick_variants(command, table, names, flag="--variants"):
    """The rows to run: a comma-separated subset of `table` (None = all), checked; an unknown name ends
    the run with one message that starts with `command` (e.g. "bench.py train")."""
    if names is None:
        return list(table)
    picked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in picked if n not in table]
    if unknown or not picked:
        raise SystemExit(f"{command}: unknown {flag} {unknown or names!r}; choose from {','.join(table)}")
    return picked


def free_memory():
    """Return the previous row's memory to the allocator and restart the peak counter."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device, resident=0):
    """Peak CUDA memory allocated since the last free_memory(), less `resident` bytes that belong to
    something else, in GiB (None on the CPU)."""
    return (torch.cuda.max_memory_allocated() - resident) / 2**30 if device.type == "cuda" else None


def weights_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def failure_note(e):
    """One line for a row whose run raised: the exception's type and first line."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"failed: {type(e).__name__}: {first}"[:160]


@contextlib.contextmanager
def environ(**values):
    """Set these environment variables inside the block, then put back what was there."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


# A row's attention column -> the environment attention.py (and magma.cross_entropy) read at every
# call; any other value is MAGMA_ATTENTION's
ATTENTION_ENV = {"auto-fusedbwd": {"MAGMA_ATTENTION": "auto", "MAGMA_FLASH_BACKWARD": "fused"},
                 "sdpa-torchce": {"MAGMA_ATTENTION": "sdpa", "MAGMA_CROSS_ENTROPY": "torch"}}


def attention_impl(impl):
    """Force attention.py's implementation inside the block (MAGMA_ATTENTION, or ATTENTION_ENV's)."""
    return environ(**ATTENTION_ENV.get(impl, {"MAGMA_ATTENTION": impl}))


@contextlib.contextmanager
def timed_graph_captures(times_ms):
    """Append the host time of every CUDA graph recording (gpt.DecodeStep._capture: two warm-up steps,
    capture, instantiation) made inside the block to times_ms: what each generate call pays that a
    graph kept from one call to the next would not."""
    import gpt
    record = gpt.DecodeStep._capture

    def timed(step):
        t0 = time.perf_counter()
        record(step)
        times_ms.append(1e3 * (time.perf_counter() - t0))

    gpt.DecodeStep._capture = timed
    try:
        yield
    finally:
        gpt.DecodeStep._capture = record


@contextlib.contextmanager
def default_dtype(dtype):
    """New parameters are created in `dtype` inside the block (a 6B model never exists in fp32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class IdTokenizer:
    """A stand-in tokenizer whose text is space-separated token ids ("464 3290"): prompts are exact ids,
    and every id of the LM's vocabulary can be generated (Magma.generate_ids masks ids >= vocab_size)."""

    def __init__(self, vocab_size):
        self.vocab_size, self.eos_id = vocab_size, vocab_size - 1

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def magma_shapes(smoke):
    """(GPTConfig, ViTConfig) of `train` and `generate`: GPT-2 124M + ViT-B/16, or tiny ones for --cpu-smoke."""
    from gpt import GPTConfig
    from vit import PRESETS, ViTConfig
    if smoke:
        return (GPTConfig(model_type="gpt2", vocab_size=300, block_size=128, n_layer=2, n_head=2, n_embd=32),
                ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, embed_dim=None))
    return GPTConfig(model_type="gpt2"), replace(PRESETS["ViT-B/16"], embed_dim=None)


def transformers_models(lm_config, vit_config, seed=0, init_std=None):
    """Random transformers GPT2LMHeadModel and CLIPVisionModel of these shapes, SDPA attention, fp32, CPU.

    init_std: redraw every weight matrix from N(0, init_std), LayerNorm gains from 1 + N(0, 0.1) and other
    vectors from N(0, 0.02) (tests use it to put greedy choices far from ties); None keeps transformers' init.
    """
    import transformers  # the reference, only for the comparison
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    c, v = lm_config, vit_config
    if c.model_type != "gpt2":
        raise ValueError(f"the transformers assembly is GPT2LMHeadModel; got model_type {c.model_type!r}")
    lm_hf = transformers.GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.n_inner, activation_function=c.activation, layer_norm_epsilon=c.layer_norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # frozen LM: no dropout, as in magma.py
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: generate runs every step
    vit_hf = transformers.CLIPVisionConfig(
        hidden_size=v.width, intermediate_size=v.hidden, num_hidden_layers=v.layers, num_attention_heads=v.heads,
        image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.act, layer_norm_eps=v.ln_eps)
    torch.manual_seed(seed)
    lm = transformers.AutoModelForCausalLM.from_config(lm_hf, attn_implementation="sdpa")
    vit = transformers.AutoModel.from_config(vit_hf, attn_implementation="sdpa")  # a CLIPVisionModel
    if init_std is not None:
        with torch.no_grad():
            for name, p in [*lm.named_parameters(), *vit.named_parameters()]:
                if p.dim() > 1:
                    p.normal_(0.0, init_std)
                elif name.endswith("weight") and ("ln" in name or "norm" in name):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.02)
    return lm.eval(), vit.eval()


def magma_from_transformers(hf_lm, hf_vit, adapters=None, prefix_dropout=0.1):
    """Our Magma holding the weights of a transformers GPT2LMHeadModel and CLIPVisionModel, read back by our
    loaders from a temporary save_pretrained directory; adds MAGMA's adapters and a new image prefix."""
    from adapters import AdapterConfig
    from gpt import GPT
    from magma import Magma, MagmaConfig
    from vit import ViT
    with tempfile.TemporaryDirectory() as tmp:
        hf_lm.save_pretrained(os.path.join(tmp, "lm"))
        hf_vit.save_pretrained(os.path.join(tmp, "vit"))
        lm = GPT.from_pretrained(os.path.join(tmp, "lm"))
        vit = ViT.from_pretrained(os.path.join(tmp, "vit"))
    config = MagmaConfig(lm=lm.config, vit=vit.config, adapters=adapters or AdapterConfig(),
                         prefix_dropout=prefix_dropout, tokenizer="ids")
    return Magma(config, lm=lm, vit=vit, tokenizer=IdTokenizer(lm.config.vocab_size))


class TransformersMagma(nn.Module):
    """MAGMA assembled from transformers, the way a user would: CLIPVisionModel -> image prefix ->
    GPT2LMHeadModel (frozen, adapters.py's adapters wrapped around its MLPs), the loss from `labels`
    (logits at every position, -100 on the image and padding positions).

    The adapters and the prefix are copies of `magma`'s. No attention_mask is passed: captions are
    right-padded, so the causal mask already keeps padding out of every real position (as in magma.py).
    """

    def __init__(self, hf_lm, hf_vit, magma):
        from adapters import add_adapters, freeze
        super().__init__()
        self.lm, self.vit = freeze(hf_lm).eval(), hf_vit
        self.adapters = add_adapters(self.lm, magma.config.adapters)  # GPT2Block has .mlp, config .n_embd
        for theirs, ours in zip(self.adapters, magma.adapters, strict=True):
            theirs.load_state_dict(ours.state_dict())
        self.prefix = copy.deepcopy(magma.prefix)

    def train(self, mode=True):
        """As nn.Module.train, except the frozen LM stays in eval mode (as Magma.train)."""
        super().train(mode)
        self.lm.eval()
        return self

    def image_embeds(self, pixels):
        hidden = self.vit(pixel_values=pixels).last_hidden_state  # (B, 1+N, width), before post_layernorm
        wte = self.lm.transformer.wte.weight
        return self.prefix(hidden.to(self.prefix.proj.weight.dtype)).to(wte.dtype)  # (B, N_img, d_lm)

    def forward(self, pixels, input_ids, text_mask):
        image = self.image_embeds(pixels)  # (B, I, C)
        x = torch.cat([image, self.lm.transformer.wte(input_ids)], dim=1)  # (B, I+T, C)
        ignore = torch.full(image.shape[:2], -100, dtype=input_ids.dtype, device=input_ids.device)
        labels = torch.cat([ignore, input_ids.masked_fill(~text_mask.bool(), -100)], dim=1)  # (B, I+T)
        return self.lm(inputs_embeds=x, labels=labels, use_cache=False).loss  # training: no KV cache built

    @torch.no_grad()
    def generate_ids(self, pixels, prompt_ids, max_new_tokens):
        """Greedy: transformers' generate from [image prefix][prompt] embeddings; the new ids of each row."""
        x = torch.cat([self.image_embeds(pixels), self.lm.transformer.wte(prompt_ids)], dim=1)  # (B, I+P, C)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        out = self.lm.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=0)  # (B, new): inputs_embeds are not echoed
        return out.tolist()


def ours_generate_ids(magma, pixels, prompt_ids, max_new_tokens, cuda_graph=False):
    """Greedy: Magma.generate_ids on [image, prompt] per row (EOS off, so every row runs every step)."""
    inputs = [[pixels[b], " ".join(str(i) for i in prompt_ids[b].tolist())] for b in range(len(pixels))]
    return magma.generate_ids(inputs, max_new_tokens, temperature=0, eos=False, cuda_graph=cuda_graph)


def build_pair(lm_config, vit_config, adapters=None, seed=0, init_std=None, prefix_dropout=0.1):
    """(ours, theirs): our Magma and the TransformersMagma with identical weights (fp32, CPU)."""
    hf_lm, hf_vit = transformers_models(lm_config, vit_config, seed, init_std)
    ours = magma_from_transformers(hf_lm, hf_vit, adapters, prefix_dropout)
    return ours, TransformersMagma(hf_lm, hf_vit, ours)


def train_flops(lm, vit, adapters, image_tokens, text_tokens):
    """FLOPs of one training sample, by part: the matmuls and attention that actually run.

    A matmul (n, k) @ (k, m) is 2nkm FLOPs, so a weight costs per token 2 forward, 2 for the gradient
    of its input and 2 for its own gradient. Frozen weights get no gradient: 4, not 6 (the gradient
    still flows through the whole LM, down to the image prefix). With S = I + T LM positions (I image
    prefix tokens, T text tokens), d the LM width, w the ViT width, V_t = 1 + N ViT tokens:

      lm          4 * S * L * (4 d^2 + 2 d d_ff)       frozen qkv, out, MLP: forward + input gradient
      lm_head     4 * T * d * vocab                    logits only at the T text positions, frozen
      adapters    6 * S * n_adapters * 2 d (d/down)    trained bottlenecks
      lm_attn     3.5 * 2 * S^2 * d * L                QK^T and PV (4 S^2 d) halved by the causal mask;
                                                       the backward (recompute S, dV, dP, dQ, dK) is 2.5x
                                                       (our kernel runs 3.5x: see attention.py, FLOPs)
      vit         6 * V_t * L_v * (4 w^2 + 2 w w_ff)   trained
      patch       4 * N * 3 p^2 * w                    trained, but pixels need no gradient
      vit_attn    3.5 * 4 * V_t^2 * w * L_v            no mask
      prefix      6 * I * w * d                        trained Linear
    Not counted: LayerNorms, activations, softmax, the loss, the optimizer (all memory-bound).
    Every row of a table is credited the same count, so MFU compares like with like: the transformers
    assembly also computes logits at the image positions, work the model does not need.
    """
    S, T, I = image_tokens + text_tokens, text_tokens, image_tokens
    d, w, Vt, N = lm.n_embd, vit.width, vit.grid ** 2 + 1, vit.grid ** 2
    n_adapters = len(range(lm.n_layer) if adapters.layers is None else adapters.layers) * len(adapters.places)
    return {
        "lm": 4 * S * lm.n_layer * (4 * d * d + 2 * d * lm.n_inner),
        "lm_head": 4 * T * d * lm.vocab_size,
        "adapters": 6 * S * n_adapters * 2 * d * max(1, d // adapters.downsample),
        "lm_attn": 7 * S * S * d * lm.n_layer,
        "vit": 6 * Vt * vit.layers * (4 * w * w + 2 * w * vit.hidden),
        "patch": 4 * N * 3 * vit.patch_size ** 2 * w,
        "vit_attn": 14 * Vt * Vt * w * vit.layers,
        "prefix": 6 * I * w * d,
    }


def generate_flops(lm, vit, adapters, image_tokens, prompt_len, new_tokens):
    """Forward FLOPs of one sequence's greedy generation, by part: the ViT and prefix once, the prefill
    of P = I + prompt_len positions (logits at the last one only), then new_tokens - 1 decode steps (the
    last new token is not fed back), step t attending to P + t cached positions. Forward only, so a
    matmul weight costs 2 per token; attention counts the positions a step needs to see (a static
    cache attends to every slot under a mask, work that is not credited).

      vit                      2 * V_t * L_v * (4 w^2 + 2 w w_ff)
      patch                    2 * N * 3 p^2 * w
      vit_attn                 4 * V_t^2 * w * L_v
      prefix                   2 * I * w * d
      lm (+ adapters)          2 * (P + new - 1) * L * (4 d^2 + 2 d d_ff)   (+ 2 d (d/down) per adapter)
      lm_attn                  2 * P^2 * d * L (causal) + 4 * d * L * sum over steps of (P + t)
      lm_head                  2 * new * d * vocab
    """
    d, w, Vt, N, I = lm.n_embd, vit.width, vit.grid ** 2 + 1, vit.grid ** 2, image_tokens
    P, steps = image_tokens + prompt_len, new_tokens - 1
    n_adapters = len(range(lm.n_layer) if adapters.layers is None else adapters.layers) * len(adapters.places)
    return {
        "vit": 2 * Vt * vit.layers * (4 * w * w + 2 * w * vit.hidden),
        "patch": 2 * N * 3 * vit.patch_size ** 2 * w,
        "vit_attn": 4 * Vt * Vt * w * vit.layers,
        "prefix": 2 * I * w * d,
        "lm": 2 * (P + steps) * lm.n_layer * (4 * d * d + 2 * d * lm.n_inner),
        "adapters": 2 * (P + steps) * n_adapters * 2 * d * max(1, d // adapters.downsample),
        "lm_attn": 2 * P * P * d * lm.n_layer + 4 * d * lm.n_layer * sum(P + t for t in range(1, steps + 1)),
        "lm_head": 2 * new_tokens * d * lm.vocab_size,
    }


def training_step(model, optimizer, pixels, input_ids, text_mask, compiled=None, autocast_cache=True):
    """One optimizer step under bf16 autocast: a closure for time_ms, returning the loss tensor."""
    # Not `compiled or model`: truth-testing a compiled module asks the module inside for its len(),
    # which a model is not, so that raised TypeError (seen on the H200 in the ours-compile row).
    forward = model if compiled is None else compiled

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, cache_enabled=autocast_cache):
            loss = forward(pixels, input_ids, text_mask)
        loss.backward()
        optimizer.step()
        return loss
    return step


def graphed(step, warmup=3):
    """step, recorded once into a CUDA graph: a function that replays it and returns its loss tensor.
    PyTorch's whole-network capture: a few eager steps on a side stream first (they allocate the
    optimizer's state and compile and autotune the Triton kernels), then one step recorded; each replay
    then writes the same gradient, activation and loss buffers, drawing new dropout masks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()  # step() sets the gradients to None first: backward allocates them in the graph

    def replay():
        graph.replay()
        return loss
    return replay


def timed_training(model, inputs, mode, warmup, iters, kernels=None):
    """Fused AdamW (on CUDA) over the trainable parameters; the first step's loss and the median step
    time. mode: "eager", "compile" or "graph" (TRAIN_VARIANTS). On a GPU, a dict passed as `kernels`
    receives each kernel's GPU microseconds per step."""
    from adapters import trainable_parameters
    cuda = inputs[0].device.type == "cuda"
    if mode == "graph" and not cuda:
        raise ValueError("CUDA graphs need a GPU")
    # capturable: the optimizer keeps its step count on the GPU, so that a replay advances it
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-4, fused=cuda, capturable=mode == "graph")
    if mode == "compile":
        torch._dynamo.reset()  # each compiled row traces its own copy afresh (no guards left from the last)
    step = training_step(model, optimizer, *inputs, compiled=torch.compile(model) if mode == "compile" else None,
                         autocast_cache=mode != "graph")  # (autocast's cast cache is not for capture)
    torch.manual_seed(0)  # the same prefix-dropout mask for every eager row's first step
    # Before any update every row has the same weights, so eager rows agree to bf16 rounding; a compiled
    # row differs a little more (inductor draws its own dropout mask).
    loss0 = step().item()
    if mode == "graph":
        step = graphed(step)
    ms = time_ms(step, warmup, iters, cuda)
    if kernels is not None and cuda:
        try:
            kernels.update(kernel_times_us(step, calls=2))
        except Exception as e:  # a diagnostic: the row keeps its timing
            print(f"  kernel times n/a: {failure_note(e)}", file=sys.stderr)
    return loss0, ms


def throughput(row, ms, batch, tokens_per_sample, flops_per_sample, peak):
    """Add ms/step, samples/s, tokens/s, achieved TFLOP/s and MFU to row."""
    row["ms_per_step"] = ms
    row["samples_per_s"] = batch / (ms * 1e-3)
    row["tokens_per_s"] = batch * tokens_per_sample / (ms * 1e-3)
    row["tflops"] = batch * flops_per_sample / (ms * 1e-3) / 1e12
    row["mfu_pct"] = 100 * row["tflops"] / peak if peak else None
    return row


def train_inputs(batch, image_size, text_len, vocab, device):
    """Random pixels and caption ids (the same for every row), every caption text_len real tokens."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)
    input_ids = torch.randint(0, vocab, (batch, text_len), generator=g)
    text_mask = torch.ones(batch, text_len, dtype=torch.bool)
    return pixels.to(device), input_ids.to(device), text_mask.to(device)


def bench_train(args):
    """One MAGMA training step (GPT-2 124M frozen + adapters, ViT-B/16, prefix), ours vs transformers."""
    from adapters import cast_frozen
    device = bench_device("train", args)
    smoke = args.cpu_smoke
    batch, text_len, warmup, iters = (2, 8, 0, 2) if smoke else (args.batch_size, args.text_len, args.warmup, args.iters)
    names = pick_variants("bench.py train", TRAIN_VARIANTS, args.variants)
    lm_config, vit_config = magma_shapes(smoke)
    masters = dict(zip(("ours", "transformers"), build_pair(lm_config, vit_config)))
    ours = masters["ours"]
    image_tokens = vit_config.grid ** 2 + (1 if ours.config.prefix_tokens == "all" else 0)
    parts = train_flops(lm_config, vit_config, ours.config.adapters, image_tokens, text_len)
    from train import peak_tflops  # one table of GPU peaks, shared with the training progress bar
    flops, peak = sum(parts.values()), peak_tflops(device)
    inputs = train_inputs(batch, vit_config.image_size, text_len, lm_config.vocab_size, device)
    rows = new_rows({
        "benchmark": "train", "dtype": "bf16 autocast (lm_weights: dtype the frozen LM is held in)",
        "shape": {"batch": batch, "image_tokens": image_tokens, "text_tokens": text_len,
                  "lm": asdict(lm_config), "vit": asdict(vit_config), "adapters": asdict(ours.config.adapters)},
        "flops_per_sample": flops, "flops_parts": parts, "peak_tflops": peak,
        "flops": train_flops.__doc__.strip(), "tokens": "tokens/s counts every LM position (image + text)",
        "transformers_extra_flops_per_sample": 4 * image_tokens * lm_config.n_embd * lm_config.vocab_size,
        "note": "the transformers assembly also projects the image positions to the vocabulary (its loss "
                "takes logits at every position): transformers_extra_flops_per_sample, not credited, and "
                "fp32 logits that count in its peak memory; x_*_vs_tf compare with the `transformers` row "
                "(fp32 frozen LM), x_*_vs_tf_same_lm with the transformers row whose LM has the same dtype",
        "kernels": "gpu_busy_ms: the kernels' GPU time in one step (torch.profiler); top_kernels_ms: the 20 "
                   "longest kernels by total time per step",
        "columns": ["variant", "lm_weights", "attention", "mode", "loss0", "ms_per_step", "gpu_busy_ms",
                    "samples_per_s", "tokens_per_s", "tflops", "mfu_pct", "peak_gib", "x_samples_vs_tf",
                    "x_memory_vs_tf", "x_samples_vs_tf_same_lm", "x_memory_vs_tf_same_lm", "note"]},
        finish=train_ratios)
    for name in names:
        assembly, lm_weights, impl, mode = TRAIN_VARIANTS[name]
        row = {"variant": name, "lm_weights": lm_weights, "attention": impl, "mode": mode}
        rows.append(row)
        if mode != "eager" and smoke:
            row["note"] = {"compile": "n/a: torch.compile is left out of the CPU smoke run",
                           "graph": "n/a: CUDA graphs need a GPU"}[mode]
            continue
        free_memory()
        oom = False
        try:
            model = copy.deepcopy(masters[assembly])
            cast_frozen(model.lm, DTYPES[lm_weights])  # adapters.cast_frozen, as train.py --lm_dtype does
            model.to(device).train()
            kernels = {}
            with attention_impl(impl) if assembly == "ours" else contextlib.nullcontext():
                row["loss0"], ms = timed_training(model, inputs, mode, warmup, iters, kernels)
            throughput(row, ms, batch, image_tokens + text_len, flops, peak)
            if kernels:  # GPU busy time below ms_per_step: the host, not the GPU, sets the pace
                row["gpu_busy_ms"] = sum(kernels.values()) / 1e3
                top = sorted(kernels.items(), key=lambda kv: -kv[1])[:20]
                row["top_kernels_ms"] = {name[:100]: round(us / 1e3, 3) for name, us in top}
            row["peak_gib"] = peak_gib(device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        except Exception as e:  # a torch.compile or Triton failure: recorded, the other rows still run
            row["note"] = failure_note(e)
        model = None  # free this row's copy before the next one is built
        if oom:
            row["note"] = "out of memory"
        print(f"  {name} done", file=sys.stderr, flush=True)
    free_memory()
    train_ratios(rows)
    return {**_HEADER, "rows": rows}


def train_ratios(rows):
    """samples/s and peak memory of each row over those of the `transformers` row (the issue's anchor:
    fp32 frozen LM) and over the transformers row whose frozen LM has the same dtype."""
    def done(name=None, lm_weights=None):
        return next((r for r in rows if r.get("samples_per_s") and r["variant"].startswith("transformers")
                     and (name is None or r["variant"] == name)
                     and (lm_weights is None or r["lm_weights"] == lm_weights)), None)
    for r in rows:
        if "samples_per_s" not in r:
            continue
        for suffix, base in (("", done(name="transformers")), ("_same_lm", done(lm_weights=r["lm_weights"]))):
            if base is not None:
                r["x_samples_vs_tf" + suffix] = r["samples_per_s"] / base["samples_per_s"]
                if r.get("peak_gib") and base.get("peak_gib"):
                    r["x_memory_vs_tf" + suffix] = r["peak_gib"] / base["peak_gib"]


def bench_generate(args):
    """Greedy decoding from one image and a prompt, at several batch sizes: tokens/s, ours vs transformers."""
    device = bench_device("generate", args)
    smoke = args.cpu_smoke
    batches, new, prompt_len, warmup, iters = ((1, 2), 8, 4, 0, 1) if smoke else (
        args.batch_sizes, args.new_tokens, args.prompt_len, args.warmup, args.iters)
    names = pick_variants("bench.py generate", GENERATE_VARIANTS, args.variants)
    dtype = torch.float32 if smoke else DTYPES[args.dtype]
    lm_config, vit_config = magma_shapes(smoke)
    ours, theirs = build_pair(lm_config, vit_config)
    ours.to(device, dtype).eval()  # the whole of both models in `dtype`: inference
    theirs.to(device, dtype).eval()
    runs = {"ours": lambda px, ids, graph: ours_generate_ids(ours, px, ids, new, graph and not smoke),
            "transformers": lambda px, ids, graph: theirs.generate_ids(px, ids, new)}
    # Both models stay on the GPU; a row's peak counts its own model's weights, not the other's.
    other_weights = {"ours": weights_bytes(theirs), "transformers": weights_bytes(ours)}
    from train import peak_tflops  # one table of GPU peaks, shared with the training progress bar
    parts = generate_flops(lm_config, vit_config, ours.config.adapters, vit_config.grid ** 2 + 1, prompt_len, new)
    flops, peak = sum(parts.values()), peak_tflops(device)
    rows = new_rows({
        "benchmark": "generate", "dtype": str(dtype).replace("torch.", ""),
        "flops_per_sequence": flops, "flops_parts": parts, "peak_tflops": peak,
        "flops": generate_flops.__doc__,
        "shape": {"prompt": f"1 image ({vit_config.grid ** 2 + 1} prefix tokens) + {prompt_len} tokens",
                  "new_tokens": new, "lm": asdict(lm_config), "vit": asdict(vit_config)},
        "timing": "wall time of the whole call (ViT + prefix + prefill + decode, and recording the CUDA "
                  "graph where there is one), EOS off; capture_ms: the median host time of that recording "
                  "within a call",
        "baseline": "transformers' generate as it comes (DynamicCache, no static cache, no torch.compile)",
        "peak_gib": "peak memory allocated during the row, less the other model's weights (both stay on "
                    "the GPU)",
        "columns": ["batch", "variant", "attention", "cuda_graph", "new_tokens", "ms", "ms_per_step",
                    "tokens_per_s", "x_vs_tf", "tflops", "mfu_pct", "agree", "capture_ms", "peak_gib", "note"]},
        finish=generate_ratios)
    for B in batches:
        g = torch.Generator().manual_seed(B)
        pixels = torch.randn(B, 3, vit_config.image_size, vit_config.image_size, generator=g).to(device, dtype)
        prompt = torch.randint(0, lm_config.vocab_size, (B, prompt_len), generator=g).to(device)
        reference = None
        for name in names:
            assembly, impl, graph = GENERATE_VARIANTS[name]
            row = {"batch": B, "variant": name, "attention": impl, "cuda_graph": graph, "new_tokens": new}
            if graph and smoke:
                row["note"] = "eager: CUDA graphs are left out of the CPU smoke run"
            rows.append(row)
            free_memory()
            captures = []
            try:
                with attention_impl(impl) if assembly == "ours" else contextlib.nullcontext():
                    fn = lambda: runs[assembly](pixels, prompt, graph)
                    tokens = fn()
                    if any(len(t) != new for t in tokens):
                        raise RuntimeError(f"{name} produced {[len(t) for t in tokens]} tokens, expected {new} per row")
                    with timed_graph_captures(captures):
                        ms = time_ms(fn, warmup, iters, device.type == "cuda")
            except Exception as e:  # out of memory, a failed graph capture, ...: recorded, the next row runs
                row["note"] = failure_note(e)
                continue
            tflops = B * flops / (ms * 1e-3) / 1e12
            row.update(ms=ms, ms_per_step=ms / new, tokens_per_s=B * new / (ms * 1e-3), tflops=tflops,
                       mfu_pct=100 * tflops / peak if peak and dtype != torch.float32 else None,  # a bf16 peak
                       peak_gib=peak_gib(device, resident=other_weights[assembly]))
            if captures:
                row["capture_ms"] = statistics.median(captures)
            if name == "transformers":
                reference = tokens
            if reference is not None:  # the fraction of tokens equal to transformers' (bf16 may drift)
                row["agree"] = sum(a == b for r, t in zip(reference, tokens) for a, b in zip(r, t)) / (B * new)
        print(f"  batch {B} done", file=sys.stderr, flush=True)
    generate_ratios(rows)
    return {**_HEADER, "rows": rows}


def generate_ratios(rows):
    """tokens/s of each row over the transformers row of its batch size."""
    for r in rows:
        base = next((b for b in rows if b["batch"] == r["batch"] and b["variant"] == "transformers"), None)
        if base is not None and "tokens_per_s" in base and "tokens_per_s" in r:
            r["x_vs_tf"] = r["tokens_per_s"] / base["tokens_per_s"]


def big_shapes(smoke):
    """GPT-J 6B's shape (d 4096, 28 layers, 16 heads, rotary_dim 64) and ViT-L/14, or tiny ones."""
    from gpt import GPTConfig
    from vit import PRESETS, ViTConfig
    if smoke:
        return (GPTConfig(model_type="gptj", vocab_size=300, block_size=128, n_layer=2, n_head=2, n_embd=32,
                          rotary_dim=8),
                ViTConfig(image_size=28, patch_size=14, width=32, layers=2, heads=2, embed_dim=None))
    return (GPTConfig(model_type="gptj", vocab_size=50400, block_size=2048, n_layer=28, n_head=16, n_embd=4096,
                      rotary_dim=64),
            replace(PRESETS["ViT-L/14"], embed_dim=None))


def bench_big(args):
    """MAGMA's real size: GPT-J-shaped LM (bf16, frozen, adapters) + ViT-L/14, at the largest batch that fits."""
    from gpt import GPT
    from magma import Magma, MagmaConfig
    from vit import ViT
    device = bench_device("big", args)
    smoke = args.cpu_smoke
    max_batch, text_len, warmup, iters = (4, 8, 0, 1) if smoke else (args.max_batch, args.text_len, args.warmup, args.iters)
    lm_config, vit_config = big_shapes(smoke)
    torch.manual_seed(0)
    with torch.device(device):
        with default_dtype(torch.bfloat16):
            lm = GPT(lm_config)  # random weights, created in bf16 on the device
        vit = ViT(vit_config)
    model = Magma(MagmaConfig(lm=lm_config, vit=vit_config, tokenizer="ids"), lm=lm, vit=vit,
                  tokenizer=IdTokenizer(lm_config.vocab_size)).train()
    lm = vit = None
    image_tokens = vit_config.grid ** 2 + 1
    parts = train_flops(lm_config, vit_config, model.config.adapters, image_tokens, text_len)
    from train import peak_tflops  # one table of GPU peaks, shared with the training progress bar
    flops, peak = sum(parts.values()), peak_tflops(device)
    n_lm = sum(p.numel() for p in model.lm.parameters() if not p.requires_grad)
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows, batch = new_rows({
        "benchmark": "big", "dtype": "frozen LM bf16, ViT/prefix/adapters fp32, bf16 autocast",
        "attention": os.environ.get("MAGMA_ATTENTION", "auto"),
        "shape": {"image_tokens": image_tokens, "text_tokens": text_len, "lm": asdict(lm_config),
                  "vit": asdict(vit_config), "lm_params": n_lm, "trained_params": n_trained},
        "max_batch": max_batch, "flops_per_sample": flops, "flops_parts": parts, "peak_tflops": peak,
        "flops": "see train_flops in bench.py",
        "columns": ["batch", "attention", "ms_per_step", "samples_per_s", "tokens_per_s", "tflops", "mfu_pct",
                    "peak_gib", "note"]}, finish=big_largest), 1
    impl = _HEADER["attention"]
    while batch <= max_batch:
        row = {"batch": batch, "attention": impl}
        rows.append(row)
        free_memory()
        oom = False
        try:
            inputs = train_inputs(batch, vit_config.image_size, text_len, lm_config.vocab_size, device)
            with attention_impl(impl):
                _, ms = timed_training(model, inputs, "eager", warmup, iters)  # (one model trains on: no loss0 column)
            throughput(row, ms, batch, image_tokens + text_len, flops, peak)
            row["peak_gib"] = peak_gib(device)
        except torch.cuda.OutOfMemoryError:
            oom = True  # handled below, once the exception (and the frames it holds) is gone
        except Exception as e:  # e.g. a Triton kernel for GPT-J's head dim 256 failing: no larger batch
            row["note"] = failure_note(e)
        inputs = None
        if oom:
            row["note"] = "out of memory"
        print(f"  batch {batch} {row.get('note', 'done')}", file=sys.stderr, flush=True)
        if "note" in row:  # out of memory or failed: no larger batch
            model.zero_grad(set_to_none=True)
            if not oom and impl != "sdpa":  # e.g. the Triton kernel failing at GPT-J's head dim 256:
                impl = "sdpa"              # this batch, and the larger ones, again with SDPA
                continue
            break
        batch *= 2
    free_memory()
    big_largest(rows)
    return {**_HEADER, "rows": rows}


def big_largest(rows):
    """The largest batch measured into the header; `capped`: it stopped at --max-batch, not at a
    failure or out of memory, so a larger batch may fit."""
    done = [r["batch"] for r in rows if "samples_per_s" in r]
    _HEADER["largest_batch"] = max(done) if done else None
    _HEADER["capped"] = bool(rows) and "samples_per_s" in rows[-1]  # the last row ran: no failure ended it


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

QUICK = {  # bench.py all --quick: the children it runs in turn, each (command, the options it gets)
    "attention": ("attention", ["--warmup", "3", "--iters", "20"]),
    "train": ("train", ["--warmup", "2", "--iters", "10",
                        "--variants", ",".join(v for v in TRAIN_VARIANTS if "compile" not in v)]),
    "generate": ("generate", ["--new-tokens", "64", "--iters", "3"]),
    "big": ("big", ["--max-batch", "64", "--warmup", "1", "--iters", "3"]),
    # One compiled row, last and on its own: a cold compile takes about a minute, which would leave the
    # eager rows' child no time (and it may be the one a time limit cuts off).
    "train-compile": ("train", ["--warmup", "2", "--iters", "10", "--variants", "ours-compile"]),
}


def stop_child(child, grace=30):
    """Ctrl-C for a child benchmark (it saves its rows and exits); killed if it is not gone in `grace` s."""
    child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def run_all(args):
    """bench.py all: each benchmark as `python bench.py NAME --json DIR/NAME.json` in a child process."""
    try:
        os.makedirs(args.json_dir, exist_ok=True)
    except OSError as e:  # e.g. an existing file of that name
        what = "is a file, not a folder" if os.path.isfile(args.json_dir) else f"cannot be made ({e.strerror or e})"
        raise SystemExit(f"bench.py all: --json-dir {args.json_dir} {what}") from None
    env = dict(os.environ)
    if args.quick:  # first configs only: autotuning compiles every config of every kernel (~3 s each)
        env.setdefault("MAGMA_FLASH_AUTOTUNE", "0")
    failed = []
    for name, (command, quick_options) in QUICK.items():
        if name != command and (args.cpu_smoke or not args.quick):  # else `train` runs its compiled rows
            continue
        cmd = [sys.executable, os.path.abspath(__file__), command, "--json",
               os.path.join(args.json_dir, f"{name}.json")]
        cmd += ["--cpu-smoke"] if args.cpu_smoke else quick_options if args.quick else []
        print(f"== {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env)
        try:
            code = child.wait(timeout=args.timeout_each)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as e:
            stop_child(child)  # it saves the rows it has measured, then exits
            if isinstance(e, KeyboardInterrupt):
                raise SystemExit(f"bench.py all: interrupted during {name}; the JSON so far is in {args.json_dir}")
            code = f"timed out after {args.timeout_each} s"
        print(f"== {name}: {'ok' if code == 0 else f'failed ({code})'} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        raise SystemExit(f"bench.py all: {', '.join(failed)} failed (see above); the others' JSON is in "
                         f"{args.json_dir}")


class ShowDefaults(argparse.HelpFormatter):
    """--help adds "(default: ...)" to every option that has a value by default."""
    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            shown = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else "%(default)s"
            text += f" (default: {shown})"
        return text


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measured speed of this codebase's pieces.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser = lambda name, **kw: sub.add_parser(name, formatter_class=ShowDefaults, **kw)  # noqa: E731
    p = add_parser("attention", help="fused Triton attention vs SDPA backends vs the reference")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of q, k and v")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run tiny shapes on the CPU (even where a GPU is) to check that the script works")
    p.add_argument("--shapes", help="comma-separated subset of: " + ",".join(s[0] for s in ATTENTION_SHAPES)
                   + " (on a CPU with --cpu-smoke: " + ",".join(s[0] for s in SMOKE_SHAPES) + ")")
    p.add_argument("--impls", help="comma-separated subset of the implementations: triton (its default backward), "
                   "triton-fusedbwd (the one-kernel backward), triton-autobwd (the faster backward, timed), "
                   "triton-{1,4,16}split and triton-blockkernel (decode), sdpa-flash, sdpa-cudnn, sdpa-efficient, "
                   "reference (default: all)")
    p.add_argument("--warmup", type=nonnegative_int, default=10, help="untimed iterations first")
    p.add_argument("--iters", type=positive_int, default=50, help="timed iterations")
    p.set_defaults(func=bench_attention)

    smoke_help = "tiny models on the CPU (even where a GPU is), a couple of steps, to check that the script works"
    variants_help = "comma-separated subset of the rows: {} (default: all)"
    p = add_parser("train", help="MAGMA training step (GPT-2 124M + adapters, ViT-B/16): ours vs transformers")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per training step")
    p.add_argument("--text-len", type=positive_int, default=64, help="text tokens after the 197 image tokens")
    p.add_argument("--variants", help=variants_help.format(",".join(TRAIN_VARIANTS)))
    p.add_argument("--warmup", type=nonnegative_int, default=5, help="untimed iterations first")
    p.add_argument("--iters", type=positive_int, default=20, help="timed iterations")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    p.set_defaults(func=bench_train)
    p = add_parser("generate", help="greedy decoding after an image and a prompt: ours vs transformers' generate")
    p.add_argument("--batch-sizes", type=positive_ints, default=(1, 32), help="comma-separated batch sizes")
    p.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per sequence")
    p.add_argument("--prompt-len", type=positive_int, default=16, help="prompt tokens after the image")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of both whole models")
    p.add_argument("--variants", help=variants_help.format(",".join(GENERATE_VARIANTS)))
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed iterations first")
    p.add_argument("--iters", type=positive_int, default=5, help="timed iterations")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    p.set_defaults(func=bench_generate)
    p = add_parser("big", help="GPT-J-shaped LM (bf16, frozen, adapters) + ViT-L/14 at the largest batch that fits")
    p.add_argument("--max-batch", type=positive_int, default=1024, help="stop doubling the batch here")
    p.add_argument("--text-len", type=positive_int, default=64, help="text tokens after the 257 image tokens")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="untimed iterations first")
    p.add_argument("--iters", type=positive_int, default=5, help="timed iterations")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    p.set_defaults(func=bench_big)
    p = add_parser("all", help="attention, train, generate and big one after another, each in its own "
                               "process (a CUDA error in one cannot spoil the next) with its JSON written "
                               "as it ends; a failure or timeout in one does not stop the others")
    p.add_argument("--json-dir", default="bench_results", help="folder for attention.json, train.json, ...")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations, generation of 64 tokens, batches up to 64 in big, one compiled "
                        "training row, attention.py's first launch configs (MAGMA_FLASH_AUTOTUNE=0 unless "
                        "set): a fraction of the time")
    p.add_argument("--timeout-each", type=positive_int, help="seconds each benchmark may run (default: no limit)")
    p.add_argument("--cpu-smoke", action="store_true", help=smoke_help)
    p.set_defaults(func=None)
    args = parser.parse_args(argv)
    if args.command != "all" and args.json:
        check_json_path(args.command, args.json)  # now, not after minutes of benchmarks
    new_rows()

    if args.command == "all":
        run_all(args)
        return

    interrupted = False
    try:
        payload = {"environment": environment(args.cpu_smoke), **args.func(args)}
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: keeping the rows measured so far", file=sys.stderr, flush=True)
        if _FINISH is not None:
            _FINISH(_ROWS)
        payload = {"environment": environment(args.cpu_smoke), "benchmark": args.command, **_HEADER,
                   "interrupted": True,
                   "columns": _HEADER.get("columns") or list(dict.fromkeys(k for r in _ROWS for k in r)),
                   "rows": _ROWS}
    env = payload["environment"]
    print(f"{payload['benchmark']} on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{payload.get('dtype', '')}")
    print_table(payload["rows"], payload["columns"])
    if args.json:
        write_json(args.command, args.json, payload)
    if interrupted:
        raise SystemExit(130)


if __name__ == "__main__":
    # Ctrl-C and SIGTERM (a time limit) both raise KeyboardInterrupt, which saves the rows measured so
    # far, even in a process started with SIGINT ignored (as `cmd &` in a script does).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
