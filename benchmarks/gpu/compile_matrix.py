"""Every Triton kernel of ``kernels/`` compiled for the cards users own, with its resources.

No GPU needed: each kernel variant is compiled ahead of time (``triton.compile`` of an
``ASTSource`` for ``GPUTarget("cuda", arch, 32)``) to PTX, and the ``ptxas`` bundled in
Triton's wheel (``ptxas-blackwell`` for sm_120 where it exists) assembles that PTX with
``-v`` for the same architecture, which reports registers per thread, spill stores and
loads (bytes), the stack frame and shared memory. Per (kernel, arch, dtype, block
configuration): ``ok`` or the compiler's error, and those resources.

Kernels and variants (the launch configurations the library uses: fixed block sizes, no
autotuning; ``num_warps`` as launched, Triton's default 4):

* ``mask_apply`` (``kernels/src/mask.py``): ``masked_weight`` (fp32/fp16/bf16), the same with
  the seed read from device memory (graph capture), ``effective_weight`` (``LOWRANK``,
  ``c·M⊙W + s·BA``), ``keep_mask`` (int8 out);
* ``dequant_mask`` (``kernels/src/nf4.py``): NF4 dequantization (plain or nested absmax)
  with or without the weight mask, fp32/fp16/bf16 out.

A variant that fails to compile or spills on any listed arch makes the exit status 1.

    python benchmarks/gpu/compile_matrix.py --json FILE [--md FILE] [--archs 80,86,89,90,120]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

ARCHS = (80, 86, 89, 90, 120)
DTYPES = ("fp32", "fp16", "bf16")


def variants(dtypes=DTYPES, blocks: Optional[tuple] = None) -> List[Dict]:
    """Every (kernel, variant, dtype, config) the library launches: name, the jit function,
    the argument types and the constexprs. ``blocks`` (BLOCK_N, BLOCK_K) replaces the
    library's tile for every kernel (to record another configuration, e.g. an old one)."""
    from rora_fast.kernels import mask, nf4
    out = []
    cfg = {"BLOCK_N": mask._COPY_BLOCK_N, "BLOCK_K": mask._COPY_BLOCK_K}
    nf4_cfg = {"BLOCK_N": nf4._BLOCK_N, "BLOCK_K": nf4._BLOCK_K}
    if blocks is not None:
        cfg = nf4_cfg = {"BLOCK_N": blocks[0], "BLOCK_K": blocks[1]}
    warps = 4  # every launch uses Triton's default
    base = dict(WRITE_MASK=False, SEED_PTR=False, LOWRANK=False)
    for dt in dtypes:
        p = "*" + dt
        out.append(dict(kernel="mask_apply", variant="masked_weight", dtype=dt,
                        fn=mask._mask_apply_kernel, warps=warps,
                        types={"W": p, "OUT": p, "scale": "fp32", "seed": "i64"},
                        consts=dict(base, **cfg)))
        out.append(dict(kernel="mask_apply", variant="masked_weight, device seed", dtype=dt,
                        fn=mask._mask_apply_kernel, warps=warps,
                        types={"W": p, "OUT": p, "scale": "fp32", "seed": "*i64"},
                        consts=dict(base, SEED_PTR=True, **cfg)))
        out.append(dict(kernel="mask_apply", variant="effective_weight (LOWRANK)", dtype=dt,
                        fn=mask._mask_apply_kernel, warps=warps,
                        types={"W": p, "OUT": p, "LB": p, "LA": p, "scale": "fp32",
                               "lr_scale": "fp32", "seed": "i64"},
                        consts=dict(base, LOWRANK=True, **cfg)))
        for nested in (False, True):
            for apply in (True, False):
                out.append(dict(kernel="dequant_mask",
                                variant=f"nf4{' nested' if nested else ''}"
                                        f"{' + mask' if apply else ''}", dtype=dt,
                                fn=nf4._dequant_mask_kernel, warps=4,
                                types={"PACKED": "*u8", "CODE": "*fp32",
                                       "ABSMAX": "*u8" if nested else "*fp32",
                                       "NCODE": "*fp32", "NABSMAX": "*fp32", "OFFSET": "*fp32",
                                       "OUT": p, "scale": "fp32", "seed": "i64"},
                                consts=dict(NESTED=nested, APPLY_MASK=apply, **nf4_cfg)))
    out.append(dict(kernel="mask_apply", variant="keep_mask", dtype="int8",
                    fn=mask._mask_apply_kernel, warps=warps,
                    types={"W": "*i8", "OUT": "*i8", "scale": "fp32", "seed": "i64"},
                    consts=dict(base, WRITE_MASK=True, **cfg)))
    return out


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_for(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its ``get_ptxas``: the bundled
    ``ptxas-blackwell`` from sm_90 on in Triton 3.9), else the bundled or system ptxas."""
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except (ImportError, AttributeError, RuntimeError):
        pass
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for n in (["ptxas-blackwell", "ptxas"] if arch >= 90 else ["ptxas", "ptxas-blackwell"]):
        if os.path.exists(os.path.join(d, n)):
            return os.path.join(d, n)
    found = shutil.which("ptxas")
    if found:
        return found
    raise FileNotFoundError(f"no ptxas in {d} or on PATH")


def resources(ptx: str, arch: int) -> Dict:
    """``ptxas -v`` of ``ptx`` for ``sm_<arch>`` (``a`` suffix where the PTX targets it)."""
    m = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    gpu = m.group(1) if m else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_for(arch), "-v", f"--gpu-name={gpu}", src, "-o",
                               os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-400:]}")
    regs = _REGS.search(log)
    sp = _SPILL.search(log)
    smem = _SMEM.search(log)
    return {"gpu_name": gpu, "registers": int(regs.group(1)) if regs else None,
            "stack_bytes": int(sp.group(1)) if sp else None,
            "spill_stores": int(sp.group(2)) if sp else None,
            "spill_loads": int(sp.group(3)) if sp else None,
            "smem_bytes": int(smem.group(1)) if smem else 0}


def compile_one(v: Dict, arch: int) -> Dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = v["fn"]
    sig = {n: ("constexpr" if n in v["consts"] else v["types"].get(n, "i32"))
           for n in fn.arg_names}
    row = {"kernel": v["kernel"], "variant": v["variant"], "arch": arch, "dtype": v["dtype"],
           "config": {k: v["consts"][k] for k in ("BLOCK_N", "BLOCK_K")} | {"num_warps": v["warps"]}}
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, dict(v["consts"])),
                           target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=v["warps"], num_stages=1))
        row.update(status="ok", **resources(k.asm["ptx"], arch))
    except Exception as e:  # every failing variant is reported, not just the first
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:600]}")
    row["seconds"] = round(time.time() - t0, 1)
    return row


def occupancy_note(regs: Optional[int], warps: int) -> str:
    """Resident warps per SM allowed by registers (64K registers, 48-64 warps per SM)."""
    if not regs:
        return ""
    per_block = regs * 32 * warps
    blocks = 65536 // max(per_block, 1)
    return f"{min(blocks * warps, 64)} warps/SM by registers"


def markdown(rows: List[Dict], title: str) -> str:
    lines = [f"# {title}", "",
             "| kernel | variant | dtype | arch | BLOCK_N×BLOCK_K, warps | status | registers | "
             "spill st/ld (B) | smem (B) | occupancy bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        cfg = f"{c['BLOCK_N']}×{c['BLOCK_K']}, {c['num_warps']}"
        if r["status"] == "ok":
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | sm_{r['arch']} | {cfg} | ok | "
                         f"{r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                         f"{r['smem_bytes']} | {occupancy_note(r['registers'], c['num_warps'])} |")
        else:
            lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | sm_{r['arch']} | {cfg} | "
                         f"**{r['status']}**: {r['error'][:120]} | | | | |")
    return "\n".join(lines) + "\n"


def failures(rows: List[Dict]) -> List[Dict]:
    return [r for r in rows if r["status"] != "ok" or (r.get("spill_stores") or 0) > 0
            or (r.get("spill_loads") or 0) > 0]


def run(archs=ARCHS, dtypes=DTYPES, subset: bool = False, log=print,
        blocks: Optional[tuple] = None, only: Optional[List[str]] = None) -> List[Dict]:
    """The matrix; ``subset``: one dtype per kernel variant (bf16, int8 for the keep-mask),
    every arch (a bounded run that still covers every kernel x arch); ``only``: these
    variant names."""
    vs = variants(("bf16",) if subset else dtypes, blocks)
    if only:
        unknown = set(only) - {v["variant"] for v in vs}
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}")
        vs = [v for v in vs if v["variant"] in only]
    rows = []
    for arch in archs:
        for v in vs:
            r = compile_one(v, arch)
            rows.append(r)
            log(f"sm_{arch} {r['kernel']} {r['variant']} {r['dtype']}: {r['status']} "
                f"regs {r.get('registers')} spills {r.get('spill_stores')}/{r.get('spill_loads')} "
                f"({r['seconds']} s)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--subset", action="store_true", help="bf16 only (every kernel x arch)")
    ap.add_argument("--variants", default=None,
                    help="only these variants (names as in the table, separated by ';')")
    ap.add_argument("--blocks", default=None,
                    help="BLOCK_N,BLOCK_K for every kernel instead of the library's (e.g. "
                         "32,128: the tile before issue 32)")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", default=None, help="Markdown table (default: --json with .md)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 is set: the interpreter cannot compile for a GPU target; "
                 "unset it")
    import triton
    blocks = tuple(int(x) for x in args.blocks.split(",")) if args.blocks else None
    rows = run([int(a) for a in args.archs.split(",")], tuple(args.dtypes.split(",")),
               args.subset, log=lambda s: print(s, flush=True), blocks=blocks,
               only=args.variants.split(";") if args.variants else None)
    bad = failures(rows)
    doc = {"triton": triton.__version__, "rows": rows, "failures": len(bad),
           "command": "python benchmarks/gpu/compile_matrix.py " + " ".join(argv or sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    md = args.md or os.path.splitext(args.json)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(rows, f"Triton kernels compiled without a GPU (triton {triton.__version__})"))
    print(f"{len(rows)} compiled, {len(bad)} failing or spilling; wrote {args.json}, {md}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
