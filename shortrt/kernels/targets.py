"""Compile every GPU kernel for real GPU targets without a GPU, and report what each uses.

``compile_all()`` compiles each Triton kernel of shortrt/kernels/ with the block sizes and warps its
launcher picks for real model shapes (head_dim 64/96/128/256, hidden up to 4096, vocabularies of 49k and 152k; the
variants OLMo-2, Phi-3 and Gemma 3 use: (1 + w) norms, GeGLU, partial rotary, head_dim 96 and 256)
for ``GPUTarget("cuda", 80, 32)`` (A100) and ``("cuda", 90, 32)`` (H100/H200), and reads from the
cubin Triton built (``cuobjdump -res-usage``) the registers, stack and local memory, and from
``ptxas -v`` on the PTX the spill bytes. Shared memory is what the launch requests (Triton's
metadata) plus any static shared memory in the cubin.

Triton compiles a JITFunction, not the interpreter's wrapper, so this must run in a process where
TRITON_INTERPRET is unset: ``python -m shortrt.kernels.targets`` prints the table (``--json`` for data).
Integer arguments are compiled without the divisibility hints a real launch may add, so a real
launch may vectorize more; the block shapes (what sets registers and shared memory) are the launchers'.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

TARGETS = ((80, 163 * 1024), (90, 227 * 1024))  # compute capability, shared memory a block may use


@dataclass
class Usage:
    kernel: str
    variant: str
    arch: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    local: int
    shared: int
    shared_limit: int


class TargetsUnavailable(RuntimeError):
    """Triton's CUDA backend or the CUDA binary tools are missing (the reason says which)."""


def _tool(name: str) -> str | None:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if name == "ptxas" and os.access("/usr/local/bin/ptxas", os.X_OK):
        return "/usr/local/bin/ptxas"
    if os.access(bundled, os.X_OK):
        return bundled
    return shutil.which(name)


def check_available() -> None:
    """Raise TargetsUnavailable with the reason unless compiling for CUDA targets can work here."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise TargetsUnavailable("TRITON_INTERPRET is set: compile in a process without it "
                                 "(python -m shortrt.kernels.targets)")
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        raise TargetsUnavailable(f"triton with its compiler is not installed ({exc})") from exc
    import triton.backends

    if "nvidia" not in getattr(triton.backends, "backends", {}):
        raise TargetsUnavailable("triton has no CUDA (nvidia) backend")
    for tool in ("ptxas", "cuobjdump"):
        if _tool(tool) is None:
            raise TargetsUnavailable(f"{tool} was not found (neither triton's bundled one nor on PATH)")


def _specs():
    """(kernel name, variant, JITFunction, signature, constexprs, options) for every kernel and shape."""
    import torch

    from . import attention, linear, qkv_rope, rmsnorm, sample, swiglu

    out = []
    # d 2560 +1: Gemma 3 4B's (1 + w) norms; 5120 fp32: OLMo-2 13B's whole-q norm in place on the fp32 qkv (40 x 128)
    for d, dtype, plus_one in ((576, "bf16", False), (2048, "bf16", False), (4096, "bf16", False),
                               (2560, "bf16", True), (5120, "fp32", False)):
        cfg = rmsnorm.launch_config(d)
        out.append(("rmsnorm", f"d={d} {dtype}{' +1' if plus_one else ''}", rmsnorm._rmsnorm_kernel,
                    {"x_ptr": f"*{dtype}", "w_ptr": "*bf16", "y_ptr": f"*{dtype}", "d": "i32", "stride_x": "i32",
                     "stride_y": "i32", "eps": "fp32", "PLUS_ONE": "constexpr", "BLOCK_D": "constexpr"},
                    {"PLUS_ONE": plus_one, "BLOCK_D": cfg["BLOCK_D"]}, {"num_warps": cfg["num_warps"]}))
    for ff, gelu in ((1536, False), (14336, False), (10240, True)):  # 10240: Gemma 3 4B's GeGLU
        cfg = swiglu.launch_config(ff)
        out.append(("swiglu", f"ff={ff} bf16 {'gelu_tanh' if gelu else 'silu'}", swiglu._swiglu_kernel,
                    {"gu_ptr": "*bf16", "y_ptr": "*bf16", "ff": "i32", "stride_gu": "i32", "stride_y": "i32",
                     "GELU_TANH": "constexpr", "BLOCK": "constexpr"}, {"GELU_TANH": gelu, "BLOCK": cfg["BLOCK"]},
                    {"num_warps": cfg["num_warps"]}))
    for (m, k, x_dtype, y_type) in ((4096, 4096, torch.bfloat16, "*bf16"), (28672, 4096, torch.bfloat16, "*bf16"),
                                    (152064, 3584, torch.bfloat16, "*bf16"), (1728, 576, torch.float32, "*fp32"),
                                    (6144, 4096, torch.bfloat16, "*fp32"),
                                    (262208, 2560, torch.bfloat16, "*bf16")):  # Gemma 3 4B's tied LM head
        cfg = linear.launch_config(1, m, k, x_dtype=x_dtype)
        x_type = "*bf16" if x_dtype == torch.bfloat16 else "*fp32"
        out.append(("linear_int8", f"m={m} k={k} x={x_type[1:]} y={y_type[1:]}", linear._linear_int8_kernel,
                    {"x_ptr": x_type, "q_ptr": "*i8", "s_ptr": "*fp32", "y_ptr": y_type, "n": "i32", "m": "i32",
                     "k": "i32", "stride_x": "i32", "stride_y": "i32", "BLOCK_N": "constexpr",
                     "BLOCK_M": "constexpr", "BLOCK_K": "constexpr", "DOT_BF16": "constexpr"},
                    {key: cfg[key] for key in ("BLOCK_N", "BLOCK_M", "BLOCK_K", "DOT_BF16")},
                    {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}))
    # (head_dim, rotary_dim, (1 + w)): Llama-like 64 / 128; Phi-3-mini's 96; 128 rotating 96 (a partial
    # rotary factor of 0.75); Gemma 3's 256 with (1 + w) q/k norms.
    for hd, rot, plus_one in ((64, 64, False), (128, 128, False), (96, 96, False), (128, 96, False),
                              (256, 256, True)):
        cfg = qkv_rope.launch_config(hd, rot)
        shape = f"hd={hd}" + (f" rot={rot}" if rot != hd else "") + (" +1" if plus_one else "")
        for is_q, norm in ((True, False), (False, False), (True, True), (False, True)):
            out.append(("rope_write", f"{shape} {'q' if is_q else 'kv'}{' +norm' if norm else ''}",
                        qkv_rope._rope_write_kernel,
                        {"qkv_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64",
                         "rows_ptr": "*i64", "norm_ptr": "*bf16", "out_ptr": "*bf16", "v_out_ptr": "*bf16",
                         "stride_qkv": "i32", "stride_cos": "i32", "stride_sin": "i32", "head0": "i32",
                         "n_out_heads": "i32", "v_offset": "i32", "S": "i32", "eps": "fp32",
                         "HALF": "constexpr", "HALF_PAD": "constexpr", "HD": "constexpr", "REST_PAD": "constexpr",
                         "NORM": "constexpr", "PLUS_ONE": "constexpr", "IS_Q": "constexpr"},
                        {"HALF": cfg["HALF"], "HALF_PAD": cfg["HALF_PAD"], "HD": hd, "REST_PAD": cfg["REST_PAD"],
                         "NORM": norm, "PLUS_ONE": plus_one and norm, "IS_Q": is_q}, {"num_warps": cfg["num_warps"]}))
    # ... (32, 32, 96): Phi-3-mini; (8, 4, 256): Gemma 3 4B (its sliding layers use the same kernel, windowed)
    for (nq, nkv, hd, S) in ((9, 3, 64, 2048), (32, 8, 128, 8192), (28, 4, 128, 8192), (16, 16, 128, 4096),
                             (8, 1, 256, 4096), (32, 32, 96, 4096), (8, 4, 256, 8192)):
        cfg = attention.launch_config(1, nq, nkv, S, hd)
        out.append(("attention_split", f"nq={nq} nkv={nkv} hd={hd} bf16 BLOCK_N={cfg['BLOCK_N']}",
                    attention._attention_split_kernel,
                    {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "rows_ptr": "*i64",
                     "lengths_ptr": "*i64", "m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "nq": "i32",
                     "nkv": "i32", "S": "i32", "hd": "i32", "scale_log2e": "fp32", "window": "i32",
                     "G": "constexpr", "G_PAD": "constexpr", "HD_PAD": "constexpr", "BLOCK_N": "constexpr"},
                    {"G": nq // nkv, "G_PAD": cfg["G_PAD"], "HD_PAD": cfg["HD_PAD"], "BLOCK_N": cfg["BLOCK_N"]},
                    {"num_warps": cfg["num_warps"]}))
    for hd in (64, 128, 256):
        out.append(("attention_combine", f"hd={hd} splits<=64", attention._attention_combine_kernel,
                    {"m_ptr": "*fp32", "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16",
                     "n_splits": "i32", "hd": "i32", "SPLITS_PAD": "constexpr", "HD_PAD": "constexpr"},
                    {"SPLITS_PAD": 64, "HD_PAD": hd},
                    {"num_warps": attention.launch_config(1, 8, 8, 4096, hd)["combine_warps"]}))
    for V in (49152, 152064, 262208):  # 262208: Gemma 3
        cfg = sample.launch_config(V)
        out.append(("sample", f"V={V}", sample._sample_kernel,
                    {"logits_ptr": "*fp32", "temperature_ptr": "*fp32", "top_k_ptr": "*i64", "top_p_ptr": "*fp32",
                     "uniform_ptr": "*fp32", "out_ptr": "*i64", "V": "i32", "stride": "i32",
                     "min_temperature": "fp32", "BLOCK_V": "constexpr"},
                    {"BLOCK_V": cfg["BLOCK_V"]}, {"num_warps": cfg["num_warps"]}))
    return out


def _ptxas_spills(ptx: str, arch: int) -> tuple[int, int] | None:
    """(spill store bytes, spill load bytes) from `ptxas -v`, lowering the PTX version if this ptxas is older."""
    ptxas = _tool("ptxas")
    target = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        for _attempt in range(2):
            with open(path, "w") as f:
                f.write(ptx)
            proc = subprocess.run([ptxas, "-v", f"-arch={target}", path, "-o", os.path.join(tmp, "k.o")],
                                  capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            newest = re.search(r"current version is '(\d+\.\d+)'", log)
            if proc.returncode != 0 and newest:
                ptx = re.sub(r"^\.version \d+\.\d+", f".version {newest.group(1)}", ptx, count=1, flags=re.M)
                continue
            break
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(m.group(1)), int(m.group(2))) if proc.returncode == 0 and m else None


def _cubin_usage(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage gave no usage line:\n{out}")
    return {"registers": int(m.group(1)), "stack": int(m.group(2)), "static_shared": int(m.group(3)),
            "local": int(m.group(4))}


def compile_all(progress=None) -> list[Usage]:
    """Compile every kernel variant for each target; Usage rows in order. Raises TargetsUnavailable."""
    check_available()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = []
    for name, variant, fn, signature, constexprs, options in _specs():
        for arch, limit in TARGETS:
            if progress:
                progress(f"{name} [{variant}] sm_{arch}")
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            usage = _cubin_usage(compiled.asm["cubin"])
            spills = _ptxas_spills(compiled.asm["ptx"], arch)
            # Without a ptxas log, local memory or stack in the cubin is where spills would go.
            stores, loads = spills if spills is not None else (usage["local"] + usage["stack"],) * 2
            rows.append(Usage(name, variant, arch, options["num_warps"], usage["registers"], stores, loads,
                              usage["stack"], usage["local"], compiled.metadata.shared + usage["static_shared"],
                              limit))
    return rows


def format_table(rows: list[Usage]) -> str:
    lines = ["| kernel | shape | target | warps | registers | spill st/ld (B) | stack | shared (B) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.variant} | sm_{r.arch} | {r.num_warps} | {r.registers} | "
                     f"{r.spill_stores}/{r.spill_loads} | {r.stack} | {r.shared} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        rows = compile_all(progress=lambda s: print(f"compiling {s}", file=sys.stderr))
    except TargetsUnavailable as exc:
        print(f"cannot compile for GPU targets: {exc}", file=sys.stderr)
        return 2
    print(json.dumps([asdict(r) for r in rows]) if "--json" in argv else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
