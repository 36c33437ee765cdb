"""Instruction counts of the Triton kernels compiled for a GPU that is not here (default sm_90, an H100/H200).

    python -m bench.sass_count [--arch 90] [--show-sass DIR]

Compiles each variant of the pass kernel (kernels/axpbz.py), of the fused replay kernel
(kernels/replay.py) and of paired mode's fused matmul (kernels/paired_linear.py) with Triton's own compiler and bundled ptxas, disassembles the cubin with the
bundled cuobjdump, and prints static counts: all instructions, shared-memory traffic (STS / LDS and
barriers: values exchanged between threads, e.g. by a layout conversion), local-memory traffic (STL / LDL:
register spills), the transcendental unit (MUFU), floors (FRND) and global accesses. Static counts
are not timings (a loop body counts once, both paths of a branch count), but they show what a change
did to the code without a GPU, and where the time of a compute-bound kernel can go; the H200 runs of
bench.sweep_pass say what the time did (docs/perf.md).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

COUNTED = ("STS", "LDS", "BAR", "STL", "LDL", "MUFU", "FRND", "LDG", "STG", "HGMMA")
_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")

_PASS_ARGS = {"proto_ptr": None, "table_ptr": "*i64", "starts_ptr": "*i64", "map_ptr": "*i32", "total": "i32",
              "a": "fp32", "b": "fp32", "seed_lo": "i32", "seed_hi": "i32", "seed_ptr": "*i64",
              "rseed_lo": "i32", "rseed_hi": "i32",
              "pair_delta": "i32"}
_REPLAY_ARGS = {"x_ptr": None, "n": "i32", "offset": "i32", "key": "i32", "steps_ptr": "*i32", "coef_ptr": "*fp32",
                "rseed_ptr": "*i32", "n_steps": "i32"}
_PAIRED_ARGS = {"x_ptr": None, "w_ptr": None, "out_ptr": "*fp32", "bias_plus_ptr": None, "bias_minus_ptr": None,
                "M_HALF": "i32", "N": "i32", "K": "i32", "k_per_split": "i32", "eps": "fp32", "seed_lo": "i32",
                "seed_hi": "i32", "key": "i32", "offset": "i32"}


def sass(fn, args: dict, constants: dict, arch: int, aligned, **options) -> str:
    """The disassembly of ``fn`` compiled for sm_``arch``; ``aligned``: the names of the arguments known
    to be multiples of 16 (pointers: 16-byte aligned), as Triton specializes them at a launch."""
    signature = dict(args, **{name: "constexpr" for name in constants})
    index = {name: i for i, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature=signature, constexprs={(index[n],): v for n, v in constants.items()},
                       attrs={(index[n],): [["tt.divisibility", 16]] for n in aligned})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


def counts(text: str) -> dict:
    ops = collections.Counter(_OP.findall(text))
    return dict(total=sum(ops.values()), **{name: ops[name] for name in COUNTED})


def variants():
    """(label, kernel, argument types, constants, launch options) of what the library launches."""
    from kernels.axpbz import DEFAULT_BLOCK, DEFAULT_CHUNK, _axpbz_table_kernel
    from kernels.paired_linear import _paired_linear_kernel

    for dtype in ("fp16", "bf16"):
        for noise, lookup, name in ((0, 1, "gaussian"), (1, 2, "rademacher")):
            for rnd in (False, True):
                const = dict(NOISE=noise, BLOCK=DEFAULT_BLOCK, CHUNK=DEFAULT_CHUNK, LOOKUP=lookup,
                             LOG2T=4 if lookup == 2 else 0, LOAD_X=True, SCALE_X=False, OUT=False, PAIR=False,
                             ROUND=rnd, ALIGNED=True, FAST=True, SEED_AT=False)
                yield (f"pass {dtype} {name} {'stochastic' if rnd else 'nearest'}", _axpbz_table_kernel,
                       dict(_PASS_ARGS, proto_ptr=f"*{dtype}"), const, ("proto_ptr",), dict(num_warps=4))
    # Paired mode's copies: both outputs of a pair from one z (a multiple of 16 elements apart).
    const = dict(NOISE=0, BLOCK=DEFAULT_BLOCK, CHUNK=DEFAULT_CHUNK, LOOKUP=1, LOG2T=0, LOAD_X=True, SCALE_X=False,
                 OUT=True, PAIR=True, ROUND=False, ALIGNED=True, FAST=True, SEED_AT=False)
    yield ("pass fp16 gaussian nearest pair", _axpbz_table_kernel, dict(_PASS_ARGS, proto_ptr="*fp16"), const,
           ("proto_ptr", "pair_delta"), dict(num_warps=4))
    from kernels.replay import _replay_kernel

    for dtype in ("fp16", "bf16"):
        for rnd in (False, True):
            const = dict(NOISE=0, BLOCK=DEFAULT_BLOCK, ROUND=rnd, FAST=True)
            yield (f"replay {dtype} gaussian {'per-pass rounding' if rnd else 'nearest'}", _replay_kernel,
                   dict(_REPLAY_ARGS, x_ptr=f"*{dtype}"), const, ("x_ptr", "steps_ptr", "coef_ptr", "rseed_ptr"),
                   dict(num_warps=4))
    # The sizes as a launch with OPT's layers specializes them (multiples of 16).
    paired_aligned = ("x_ptr", "w_ptr", "out_ptr", "M_HALF", "N", "K", "k_per_split")
    for dtype in ("fp16", "bf16"):
        for noise, name in ((0, "gaussian"), (1, "rademacher")):
            const = dict(NOISE=noise, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64 if noise == 0 else 128, DIRECT=False,
                         HAS_BIAS=False, FAST=True)
            yield (f"paired {dtype} {name} 128x64x{const['BLOCK_K']}", _paired_linear_kernel,
                   dict(_PAIRED_ARGS, x_ptr=f"*{dtype}", w_ptr=f"*{dtype}", bias_plus_ptr=f"*{dtype}",
                        bias_minus_ptr=f"*{dtype}"), const, paired_aligned, dict(num_warps=8, num_stages=3))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--show-sass", type=Path, default=None, help="also write each disassembly into this folder")
    args = p.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    print(f"{'variant':42} {'total':>6} " + " ".join(f"{c:>5}" for c in COUNTED))
    for label, fn, arg_types, const, aligned, options in variants():
        text = sass(fn, arg_types, const, args.arch, aligned, enable_fp_fusion=False, **options)
        if args.show_sass:
            args.show_sass.mkdir(parents=True, exist_ok=True)
            (args.show_sass / (label.replace(" ", "_") + ".sass")).write_text(text)
        c = counts(text)
        print(f"{label:42} {c['total']:6d} " + " ".join(f"{c[name]:5d}" for name in COUNTED))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
