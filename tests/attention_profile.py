"""One forward+backward of each attention implementation on bench.py's shapes, for Nsight Compute.

    ncu --profile-from-start off --set full --csv --page raw \\
        python tests/attention_profile.py --shapes vit-b16,long > ncu_raw.csv

Why: on the H200 the Triton kernel's backward took 0.6-1.0 ms on the short shapes (ViT-B/16, 197
tokens; ViT-L/14@336; GPT-2) where SDPA-flash took 0.27-0.43 ms, but kept pace on the long one, and
nothing in its compiled code (tests/attention_ptxas_check.py: registers, spills, wgmma, pipelining)
says why. The hardware counters do: per kernel, its duration, the occupancy it reached, how busy the
tensor cores and memory were, and what its warps waited on. bench.py's attention rows give the times;
this gives the reasons.

Each (shape, implementation) is run once untimed (compiles the kernels), then once more between
cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off` profiles exactly those
kernels, in the order printed to stderr. Not a pytest test; on a CPU (TRITON_INTERPRET=1 for the Triton
rows) it runs bench.py's tiny --cpu-smoke shapes, to check that the script works.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

import attention as A  # noqa: E402
import bench  # noqa: E402

IMPLS = ("triton", "triton-fusedbwd", "sdpa-flash", "sdpa-cudnn")


def forward_backward(fn, q, k, v, do, causal):
    """dq, dk, dv of fn's output against the upstream gradient do."""
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(qg, kg, vg, causal), (qg, kg, vg), do)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", help="comma-separated bench.py attention shapes (default: vit-b16,gpt2,long; "
                                    "on a CPU, the --cpu-smoke ones); decode has no backward: not taken")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, of: " + ", ".join(IMPLS))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    table = {s[0]: s for s in (bench.ATTENTION_SHAPES if cuda else bench.SMOKE_SHAPES) if s[3] > 1}
    shapes = args.shapes or ("vit-b16,gpt2,long" if cuda else ",".join(table))
    names = bench.pick_variants("attention_profile.py", list(table), shapes, flag="--shapes")
    impls = bench.pick_variants("attention_profile.py", IMPLS, args.impls, flag="--impls")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # (the interpreter: fp32)
    every = bench.attention_impls(A, decode=False)
    for name in names:
        _, B, H, Tq, Tk, D, causal = table[name]
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for T in (Tq, Tk, Tk, Tq))
        for impl in impls:
            if impl.startswith("triton") and not (cuda or A.INTERPRET):
                print(f"{name} {impl}: skipped (CPU tensors need TRITON_INTERPRET=1)", file=sys.stderr)
                continue
            reason = bench.refusal(every[impl], q, k, v, causal)
            if reason is not None:
                print(f"{name} {impl}: skipped ({reason})", file=sys.stderr)
                continue
            forward_backward(every[impl], q, k, v, do, causal)  # compiles; not profiled
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.start()
            grads = forward_backward(every[impl], q, k, v, do, causal)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
            assert all(torch.isfinite(t).all() for t in grads), f"{name} {impl}: non-finite gradients"
            print(f"{name} (B,H,Tq,Tk,D = {B},{H},{Tq},{Tk},{D}, causal={causal}) {impl}: profiled",
                  file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
