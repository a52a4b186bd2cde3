"""Compile attention.py's Triton kernels for an H100 (sm_90a) without a GPU, and print per launch config
the registers per thread, the bytes spilled to local memory, the shared memory it needs, and whether
its main loop was pipelined (asynchronous copies into shared memory).

    python tests/attention_ptxas_check.py [--dtype bf16] [--head-dims 64,128] [--kernels fwd,dq]
    python tests/attention_ptxas_check.py --sass fwd --head-dims 64    # also count the SASS opcodes

Not a pytest test (it takes minutes, and the figures depend on the Triton version and its ptxas): it
gives the figures quoted above the launch tables in attention.py.

What is compiled is what a launch on the GPU compiles. attention.py's own launchers run on model-shaped
CPU tensors (q, k, v as views of one (B, T, 3, H, D) projection, as gpt.py and vit.py make them) with
the Triton calls intercepted, and each intercepted call goes through Triton's own argument binder:
a stride of 1 becomes a constant and strides and pointers divisible by 16 are marked so, exactly as
at launch. (Compiling from a hand-written signature without those marks gives scalar loads and an
unpipelined loop: other registers, other shared memory, other code.) `ptxas -v` from the Triton wheel
assembles the PTX and reports registers and spills. Exits 1 if any config fails to compile or needs
more shared memory than an H100 block may have (227 KiB).
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import attention as A  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use on an H100
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def tool(name):
    """A CUDA tool from Triton's wheel (3.9 ships a newer ptxas for Blackwell, which reads its PTX)."""
    newer = os.path.join(BIN, "ptxas-blackwell")
    if name == "ptxas" and triton.__version__ >= "3.9" and os.path.exists(newer):
        name = "ptxas-blackwell"
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise SystemExit(f"no {name} in {BIN}")
    return path


def captured_launches(D, causal, padded, dtype, T=256, B=2, H=2):
    """kernel name -> (JIT function, args, constexpr kwargs) of one forward call, a backward call with
    each backward ("fused" only for 16-bit inputs) and one decode step, as attention.py's launchers issue
    them; nothing runs."""
    log = {}

    def fake_launch(name, block_d, grid, args, consts):
        log[name] = (A.KERNELS[name], args, dict(consts))

    class Recorder:  # stands in for a JIT function: fn[grid](*args, **kwargs) is recorded
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.__setitem__(self.name, (self.fn, args, kwargs))

    def qkv(t):  # three (B, H, t, D) views of one (B, t, 3, H, D) tensor: strides as the models make them
        x = torch.zeros(B, t, 3, H, D, dtype=dtype)
        return [x[:, :, i].transpose(1, 2) for i in range(3)]

    q, k, v = qkv(T)
    kpm = torch.ones(B, T, dtype=torch.uint8) if padded else q  # q: the launchers' "no mask" stand-in
    kpm_stride, scale = (T if padded else 0), D ** -0.5
    saved = A._launch, A._decode_kernel, A._decode_merge_kernel, A._bwd_delta_kernel
    A._launch = fake_launch
    A._decode_kernel = Recorder("decode", saved[1])
    A._decode_merge_kernel = Recorder("merge", saved[2])
    A._bwd_delta_kernel = Recorder("delta", saved[3])
    try:
        o, lse2 = A._flash_forward(q, k, v, causal, kpm, kpm_stride, scale)
        do = qkv(T)[0]
        A._flash_backward(do, q, k, v, o, lse2, causal, kpm, kpm_stride, scale)
        A._flash_backward(do, q, k, v, o, lse2, causal, kpm, kpm_stride, scale, backward="fused")  # 16-bit only
        A._flash_forward(qkv(1)[0], k, v, False, kpm, kpm_stride, scale, decode_splits=4)  # one decode step
    finally:
        A._launch, A._decode_kernel, A._decode_merge_kernel, A._bwd_delta_kernel = saved
    return log


def compile_launch(fn, args, kwargs):
    """Compile fn for sm_90a as a launch with these arguments would (Triton's binder specializes them)."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=TARGET, options=options.__dict__)


def ptxas_report(kernel):
    """(registers, spilled bytes) from ptxas -v on the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([tool("ptxas"), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    report = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", report)
    if out.returncode != 0 or regs is None:
        raise RuntimeError(report[-2000:])
    spill = re.search(r"(\d+) bytes spill stores", report)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def sass_counts(kernel):
    """Opcode -> count in the kernel's SASS (static counts over the whole kernel, not executed ones)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


SASS_SHOWN = ("HGMMA", "FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "FSEL", "F2FP", "LDG", "LDGSTS", "STS", "BAR")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "tf32"],
                   help="fp32: exact dots (IEEE_CONFIGS); tf32: fp32 inputs, TF32 dots (TF32_CONFIGS)")
    p.add_argument("--head-dims", default="16,32,64,128,256")
    p.add_argument("--kernels", default="fwd,dkdv,dq,fused,decode",
                   help="fused: the one-kernel backward (MAGMA_FLASH_BACKWARD=fused), 16-bit inputs only")
    p.add_argument("--sass", default="", help="comma-separated kernels whose SASS opcodes are counted too")
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype, torch.float32)
    precision = {"fp32": "ieee", "tf32": "tf32"}.get(args.dtype)
    if precision:  # the launchers read the dot precision from PyTorch's matmul setting
        torch.set_float32_matmul_precision("highest" if precision == "ieee" else "high")
    print(f"triton {triton.__version__}, {os.path.basename(tool('ptxas'))}, sm_90a, {args.dtype}")
    failures = 0
    variants = ((False, False), (True, False), (True, True))  # (causal, key padding)
    for d in (int(x) for x in args.head_dims.split(",")):
        launches = {v: captured_launches(d, *v, dtype) for v in variants}
        for name in args.kernels.split(","):
            if name == "fused" and dtype == torch.float32:
                continue  # fp32 inputs always take the two-kernel backward
            if name == "decode":  # causal is a no-op for one query
                runs = [(launches[(True, padded)]["decode"], {},
                         "(BLOCK_N, warps, stages) {} kpm={}".format(
                             A._decode_config(d, dtype, precision or "tf32"), padded))
                        for padded in (False, True)]
            else:
                runs = [(launches[(causal, padded)][name],
                         dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s),
                         f"{(m, n, w, s)} causal={causal} kpm={padded}")
                        for m, n, w, s in A._configs(name, d, precision)
                        for causal, padded in variants]
            for (fn, fn_args, fn_kwargs), config, label in runs:
                try:
                    kernel = compile_launch(fn, fn_args, {**fn_kwargs, **config, **A.LAUNCH_OPTIONS})
                    regs, spill = ptxas_report(kernel)
                    smem = kernel.metadata.shared
                    ops = sass_counts(kernel)
                    line = (f"D{d:<3} {name:6} {label}: {regs} registers, spill {spill} bytes, shared "
                            f"{smem // 1024} KiB, {'pipelined' if ops['LDGSTS'] else 'not pipelined'}")
                    if name in args.sass.split(","):
                        line += "; SASS " + " ".join(f"{op}={ops[op]}" for op in SASS_SHOWN)
                    if smem > MAX_SHARED:
                        failures += 1
                        line += "  TOO MUCH SHARED MEMORY: fails to launch"
                    print(line, flush=True)
                except Exception as e:  # report every failing config, then exit 1
                    failures += 1
                    print(f"D{d:<3} {name:6} {label}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
