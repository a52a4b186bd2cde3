"""Measured speed, against the alternatives a user would pick. One subcommand per benchmark:

    python bench.py attention [--dtype bf16] [--json out.json]   # the fused kernel vs SDPA backends
    python bench.py attention --cpu-smoke                          # tiny CPU shapes: does the script run?

Each subcommand is one function `bench_<name>(args)` returning a payload {"rows": [...], "columns":
[...]}; main() adds the environment (device, torch, triton), prints the rows as a table and writes
them as JSON. Timings are CUDA-event medians after a warmup (the warmup also absorbs Triton's
compilation and autotuning). Nothing here is asserted: speed is reported, never tested.
"""
import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------
# Shared: timing, environment, table, JSON
# ------------------------------------------------------------------------------------------------

def time_ms(fn, warmup, iters, cuda):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def environment():
    """What the numbers were measured on."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "python": platform.python_version(),
    }


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def print_table(rows, columns):
    """Print rows (dicts) as an aligned text table with the given columns."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------
# bench.py attention
# ------------------------------------------------------------------------------------------------

# name, B, H, Tq, Tk, D, causal (the shapes the models run: issue 3)
ATTENTION_SHAPES = [
    ("gpt2", 8, 12, 1024, 1024, 64, True),
    ("gptj", 4, 16, 2048, 2048, 128, True),
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


def attention_impls(A, decode):
    """name -> fn(q, k, v, causal) for every implementation compared."""
    impls = {"triton": lambda q, k, v, causal: A.flash_attention(q, k, v, causal)}
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
        except (RuntimeError, ValueError) as e:
            # SDPA warns "<backend> not used because:" and then the reason; keep the reasons
            why = [str(w.message).strip().split("\n")[0] for w in caught]
            why = [w for w in why if w and not w.endswith("because:")]
            return "; ".join(why[:2]) or str(e).strip().split("\n")[0]


def bench_attention(args):
    """Forward and forward+backward TFLOP/s (decode: µs per call) for each shape and implementation."""
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        raise SystemExit("bench.py attention: no CUDA GPU found. The timings are meant for a GPU; "
                         "run with --cpu-smoke to exercise the script on tiny CPU shapes "
                         "(set TRITON_INTERPRET=1 to include the Triton kernel).")
    import attention as A
    device = "cuda" if cuda else "cpu"
    dtype = DTYPES[args.dtype] if cuda else torch.float32  # the interpreter mishandles bf16 dots
    shapes = ATTENTION_SHAPES if cuda else SMOKE_SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    warmup, iters = (args.warmup, args.iters) if cuda else (0, 1)
    rows = []
    for name, B, H, Tq, Tk, D, causal in shapes:
        decode = Tq == 1
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g)
                       for T in (Tq, Tk, Tk, Tq))
        flops = attention_flops(B, H, Tq, Tk, D, causal)
        for impl, fn in attention_impls(A, decode).items():
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
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                row["note"] = f"backward n/a: {str(e).splitlines()[0]}"[:100]
                continue
            row["fwdbwd_ms"] = ms
            row["fwdbwd_tflops"] = 3.5 * flops / (ms * 1e-3) / 1e12  # backward = 2.5x forward
            if cuda:
                torch.cuda.empty_cache()
        print(f"  {name} done", file=sys.stderr, flush=True)
    columns = ["shape", "B,H,Tq,Tk,D", "causal", "impl", "fwd_ms", "fwd_tflops", "fwdbwd_ms",
               "fwdbwd_tflops", "fwd_us", "GB/s", "note"]
    return {"benchmark": "attention", "dtype": str(dtype).replace("torch.", ""),
            "flops": "4*B*H*Tq*Tk*D forward, halved when causal; forward+backward = 3.5x forward",
            "columns": columns, "rows": rows}


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Measured speed of this codebase's pieces.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("attention", help="fused Triton attention vs SDPA backends vs the reference")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="without a GPU: run tiny shapes on CPU to check that the script works")
    p.add_argument("--shapes", help="comma-separated subset of: " + ",".join(s[0] for s in ATTENTION_SHAPES))
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.set_defaults(func=bench_attention)
    args = parser.parse_args(argv)

    payload = {"environment": environment(), **args.func(args)}
    env = payload["environment"]
    print(f"{payload['benchmark']} on {env['device']}, torch {env['torch']}, triton {env['triton']}, "
          f"{payload.get('dtype', '')}")
    print_table(payload["rows"], payload["columns"])
    if args.json:
        write_json(args.json, payload)


if __name__ == "__main__":
    main()
