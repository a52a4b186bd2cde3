"""Compile attention.py's Triton kernels for an H100 (sm_90a) without a GPU, and print per launch config
the registers per thread, the bytes spilled to local memory and the shared memory it needs.

    python tests/attention_ptxas_check.py [--dtype bf16] [--head-dims 64,128] [--kernels fwd,dq]

Not a pytest test (it takes minutes, and the figures depend on the Triton version and its ptxas): it
gives the figures quoted above the launch tables in attention.py. triton.compile lowers each kernel to
PTX for the target; `ptxas -v` from the Triton wheel assembles it and reports the registers and spills.
Exits 1 if any config fails to compile.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import attention as A  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def ptxas_path():
    """The ptxas in Triton's wheel that reads its PTX version (3.9 ships a newer one for Blackwell)."""
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        path = os.path.join(bin_dir, name)
        if os.path.exists(path) and (name == "ptxas" or triton.__version__ >= "3.9"):
            return path
    raise SystemExit(f"no ptxas in {bin_dir}")


def signature(fn, pointers, consts):
    """Triton's type string per argument: pointers as given, the two scales fp32, other ints i32."""
    return {name: "constexpr" if name in consts else pointers.get(name) or
            ("fp32" if name in ("qk_scale", "sm_scale") else "i32") for name in fn.arg_names}


def compile_one(fn, pointers, consts, num_warps, num_stages, ptxas):
    """(registers, spilled bytes, shared memory bytes) of one kernel at one config."""
    src = ASTSource(fn, signature(fn, pointers, consts), consts)
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    report = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", report)
    if out.returncode != 0 or regs is None:
        raise RuntimeError(report[-2000:])
    spill = re.search(r"(\d+) bytes spill stores", report)
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, kernel.metadata.shared


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--head-dims", default="16,32,64,128,256")
    p.add_argument("--kernels", default="fwd,dkdv,dq,decode")
    args = p.parse_args()
    ptxas, t = ptxas_path(), "*" + args.dtype
    f32, u8 = "*fp32", "*u8"
    pointers = {
        "fwd": dict(Q=t, K=t, V=t, O=t, LSE=f32, KPM=u8),
        "dkdv": dict(Q=t, K=t, V=t, DO=t, LSE=f32, DELTA=f32, KPM=u8, DK=t, DV=t),
        "dq": dict(Q=t, K=t, V=t, DO=t, LSE=f32, DELTA=f32, KPM=u8, DQ=t),
        "decode": dict(Q=t, K=t, V=t, KPM=u8, OP=f32, LSEP=f32),
    }
    tables = {"fwd": A.FWD_CONFIGS, "dkdv": A.DKDV_CONFIGS, "dq": A.DQ_CONFIGS}
    print(f"triton {triton.__version__}, {os.path.basename(ptxas)}, sm_90a, {args.dtype}")
    failures = 0
    for d in (int(x) for x in args.head_dims.split(",")):
        for name in args.kernels.split(","):
            if name == "decode":
                runs = [(dict(HEAD_DIM=d, BLOCK_D=d, HAS_KPM=kpm, BLOCK_N=A.DECODE_BLOCK_N[d]),
                         A.DECODE_WARPS, 3, f"BLOCK_N {A.DECODE_BLOCK_N[d]}, kpm={kpm}") for kpm in (False, True)]
            else:
                runs = [(dict(HEAD_DIM=d, BLOCK_D=d, CAUSAL=causal, HAS_KPM=kpm, PRECISION="tf32",
                              BLOCK_M=m, BLOCK_N=n), w, s, f"{(m, n, w, s)} causal={causal} kpm={kpm}")
                        for m, n, w, s in tables[name][d]
                        for causal, kpm in ((False, False), (True, False), (True, True))]
            for consts, warps, stages, label in runs:
                fn = A.KERNELS.get(name, A._decode_kernel)
                try:
                    regs, spill, smem = compile_one(fn, pointers[name], consts, warps, stages, ptxas)
                    print(f"D{d:<3} {name:6} {label}: {regs} registers, spill {spill} bytes, "
                          f"shared {smem // 1024} KiB", flush=True)
                except Exception as e:  # report every failing config, then exit 1
                    failures += 1
                    print(f"D{d:<3} {name:6} {label}: FAILED {type(e).__name__}: {str(e)[:500]}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
