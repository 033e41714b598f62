"""Models of the size people prune: calibrate -> prune -> generate on a synthetic 8B-class checkpoint.

    python benchmarks/scale.py --shape llama3-8b                   # ~16 GB of bf16 weights
    python benchmarks/scale.py --shape llama3.2-1b --steps calibrate,prune   # a quicker check

No 8B weights ship offline, so the checkpoint is synthetic: the named model's shapes (config.json
as its publisher writes it), bf16 weights drawn N(0, 0.02) from a fixed seed, norms 1, and the
default model's tokenizer (its ids fit in the larger vocabulary). Its scores mean nothing; what is
measured is time and memory, which depend only on the shapes and dtypes. Each step runs in its
own process, which reports its peak resident memory (VmHWM: anonymous and mapped file pages
both) and wall time:

  calibrate   shortrt calibrate --stream (one layer's weights at a time), --tokens, all spans
  prune       shortrt prune --remove K from those scores (tensors copied in bounded pieces)
  replace     shortrt replace --kind mlp --stream over the same span length: states captured one
              layer at a time, --replace-steps Adam steps of the one MLP block (few: cost, not quality)
  generate    the C++ runtime, --dtypes each, dense and pruned: load time, decode tok/s after a
              short prompt, bytes read per token, and decode as a share of the measured
              memory bandwidth (bytes per token x tok/s / bandwidth)

The checkpoint is written once under $SHORTRT_CACHE/bench/synthetic-<shape>.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import harness  # noqa: E402

SHAPES = {
    # Meta's published config.json values for these models.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=True),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                        tie_word_embeddings=True),
    # Qwen2.5-0.5B's published shape (q/k/v with biases, 2 kv heads of 64, a tied 151,936-token head).
    "qwen2.5-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=32768,
                         tie_word_embeddings=True, rms_norm_eps=1e-6),
}
STEPS = ("calibrate", "prune", "replace", "generate")


def synthetic_checkpoint(shape: str, out: Path) -> Path:
    """Write (once) a bf16 checkpoint of `shape` with random weights (a Llama unless the shape names
    another architecture; Qwen2 gets its q/k/v biases); returns its directory. The tokenizer is the
    default model's: prompts use its ids, and the embedding rows past them are never looked up."""
    import shutil

    import torch

    from shortrt.checkpoint import load, move_into_place, staging_dir
    from shortrt.safetensors_writer import TensorSource, write_sharded

    if (out / "config.json").is_file():
        return out
    c = SHAPES[shape]
    hidden, inter, heads, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = hidden // heads
    default = load("default")
    tok_config = default.config()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "head_dim": head_dim, "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
              "bos_token_id": tok_config.get("bos_token_id"), "eos_token_id": tok_config.get("eos_token_id"), **c}
    qkv_bias = c.get("model_type") == "qwen2"
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                       p + "self_attn.k_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.v_proj.weight": (kv * head_dim, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (heads * head_dim,),
                           p + "self_attn.k_proj.bias": (kv * head_dim,), p + "self_attn.v_proj.bias": (kv * head_dim,)})

    def pieces(name: str, shape: tuple[int, ...]):
        rows_per_piece = max(1, (64 << 20) // (2 * math.prod(shape[1:])))
        gen = torch.Generator().manual_seed(sum(map(ord, name)) * 7919 + len(name))
        for start in range(0, shape[0], rows_per_piece):
            n = min(rows_per_piece, shape[0] - start)
            if name.endswith("norm.weight"):
                t = torch.ones(n, *shape[1:], dtype=torch.bfloat16)
            else:
                t = torch.empty(n, *shape[1:]).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
            yield t.reshape(-1).view(torch.uint8).numpy().tobytes()

    total = sum(2 * math.prod(s) for s in shapes.values())
    print(f"writing a synthetic {shape} checkpoint ({total / 1e9:.1f} GB of bf16) to {out}", file=sys.stderr)
    tensors = [TensorSource(n, "BF16", list(s), lambda n=n, s=s: pieces(n, s)) for n, s in shapes.items()]
    out.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(out) as tmp:
        write_sharded(tmp, tensors, max_shard_bytes=4 << 30, metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in default.path.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copy2(f, tmp / f.name)
        move_into_place(tmp, out)
    return out


# ----------------------------------------------------------------------------- worker side

def worker(spec: dict) -> dict:
    """One step in this (fresh) process: a shortrt command, or an engine's decode measurement."""
    t0 = time.perf_counter()
    if spec["step"] == "cli":
        from shortrt.cli import main

        rc = main(spec["argv"])
        if rc:
            raise SystemExit(rc)
        return {"seconds": time.perf_counter() - t0}
    out = harness.worker_shortrt(spec)
    out["seconds"] = time.perf_counter() - t0
    return out


def run(spec: dict, timeout_s: float) -> dict:
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS=str(spec.get("threads", 2)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout_s:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"failed": f"exit code {proc.returncode}", "stderr_tail": harness._tail(proc.stderr)}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    p.add_argument("--remove", type=int, default=8, help="layers prune removes")
    p.add_argument("--replace-steps", type=int, default=10, help="Adam steps of the replace step")
    p.add_argument("--dtypes", default="bf16,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    p.add_argument("--out", default=str(HERE / "results" / "scale"), help="directory for <shape>.json and .md")
    p.add_argument("--chart", action="store_true",
                   help="only draw <out>/costs.png (peak memory and seconds of each step against the weights' "
                        "size) from every <shape>.json in --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.chart:
        print(chart(Path(args.out)))
        return
    if args.worker:
        spec = json.loads(args.worker)
        result = worker(spec)
        result["peak_rss_bytes"] = harness.rss_bytes()
        print("RESULT " + json.dumps(result), flush=True)
        return

    from shortrt.checkpoint import cache_dir

    steps = args.steps.split(",")
    bench = cache_dir() / "bench"
    src = synthetic_checkpoint(args.shape, bench / f"synthetic-{args.shape}")
    scores, pruned = bench / f"synthetic-{args.shape}.scores.json", bench / f"synthetic-{args.shape}-p{args.remove}"
    rows: list[dict] = []

    def record(name: str, spec: dict) -> dict:
        print(f"{name} ...", file=sys.stderr, flush=True)
        r = {"step": name, **run(spec, args.timeout)}
        print(f"{name}: " + ("FAILED " + r["failed"] if "failed" in r else
                             f"{r['seconds']:.0f} s, peak {r['peak_rss_bytes'] / 2**30:.2f} GiB"), file=sys.stderr)
        rows.append(r)
        return r

    if "calibrate" in steps:
        record("calibrate", {"step": "cli", "argv": ["calibrate", str(src), "--out", str(scores), "--force",
                                                     "--tokens", str(args.tokens), "--stream"]})
    if "prune" in steps:
        record("prune", {"step": "cli", "argv": ["prune", str(src), "--scores", str(scores), "--remove",
                                                 str(args.remove), "--out", str(pruned), "--force"]})
    if "replace" in steps:
        import shutil

        replaced = bench / f"synthetic-{args.shape}-r{args.remove}"
        record("replace", {"step": "cli", "argv": ["replace", str(src), "--scores", str(scores), "--remove",
                                                   str(args.remove), "--kind", "mlp", "--stream", "--tokens",
                                                   str(args.tokens), "--steps", str(args.replace_steps),
                                                   "--out", str(replaced), "--force"]})
        shutil.rmtree(replaced, ignore_errors=True)  # measured for its cost only; it is as large as the pruned copy
    if "generate" in steps:
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(src)("The history of the city begins", add_special_tokens=False)["input_ids"]
        bandwidth = harness.measure_bandwidth(args.threads)
        for dtype in args.dtypes.split(","):
            for label, path in (("dense", src), (f"-{args.remove} layers", pruned)):
                r = record(f"generate {dtype} {label}", {"step": "engine", "path": str(path), "dtype": dtype,
                                                          "threads": args.threads, "context": 256, "reps": 1,
                                                          "prompt": prompt, "new_tokens": args.new_tokens,
                                                          "decode_prompt_tokens": len(prompt)})
                if "failed" not in r:
                    r["bandwidth_share"] = r["bytes_per_token"] * r["decode_tok_s"] / bandwidth
        for dtype in args.dtypes.split(","):
            dense = next((r for r in rows if r["step"] == f"generate {dtype} dense" and "failed" not in r), None)
            cut = next((r for r in rows if r["step"] == f"generate {dtype} -{args.remove} layers" and "failed" not in r), None)
            if dense and cut:
                ideal = dense["bytes_per_token"] / cut["bytes_per_token"]
                cut["speedup"] = cut["decode_tok_s"] / dense["decode_tok_s"]
                cut["share_of_ideal_speedup"] = cut["speedup"] / ideal
    result = {"command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": harness.machine(), "shape": args.shape, "config": SHAPES[args.shape],
              "weights_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")), "rows": rows}
    if "generate" in steps:
        result["bandwidth_gb_s"] = bandwidth / 1e9
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = merged_with_earlier(out / f"{args.shape}.json", result, steps)
    (out / f"{args.shape}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / f"{args.shape}.md").write_text(md + "\n")
    print(md)
    print(chart(out))


def chart(out: Path) -> Path:
    """costs.png: per step, peak resident memory and seconds against the checkpoint's bf16 bytes,
    one point per shape measured (every <shape>.json in `out`); failed rows are left out."""
    results = []
    for path in sorted(out.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            continue
        if "weights_bytes" in doc and "rows" in doc:
            results.append(doc)
    if not results:
        raise SystemExit(f"no scale results (<shape>.json) in {out}")
    results.sort(key=lambda d: d["weights_bytes"])

    def kind(step: str) -> str:  # "generate bf16 -4 layers" and "-8 layers" are one series: pruned
        return re.sub(r"-\d+ layers", "pruned", step)

    steps = []
    for doc in results:
        steps += [kind(r["step"]) for r in doc["rows"] if kind(r["step"]) not in steps and "failed" not in r]
    fig, (mem, sec) = _two_panels()
    for step in steps:
        pts = [(d["weights_bytes"] / 1e9, r) for d in results for r in d["rows"]
               if kind(r["step"]) == step and "failed" not in r]
        xs = [x for x, _ in pts]
        mem.plot(xs, [r["peak_rss_bytes"] / 2**30 for _, r in pts], "o-", label=step)
        sec.plot(xs, [r["seconds"] for _, r in pts], "o-", label=step)
    mem.set(xlabel="bf16 weights (GB)", ylabel="peak resident memory (GiB)", title="memory per step")
    sec.set(xlabel="bf16 weights (GB)", ylabel="seconds", title="time per step (shared machine: see the tables)")
    mem.axhline(4, color="grey", lw=0.8, ls="--")
    mem.legend(fontsize=7)
    names = ", ".join(d["shape"] for d in results)
    fig.suptitle(f"benchmarks/scale.py: synthetic checkpoints ({names}); random weights measure cost only")
    fig.tight_layout()
    path = out / "costs.png"
    fig.savefig(path, dpi=110)
    return path


def _two_panels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    return fig, axes


def merged_with_earlier(path: Path, result: dict, steps: list[str]) -> dict:
    """`result` plus the rows of the steps this run did not take from an earlier result of the same
    shape and weights (a step can be rerun alone, e.g. generate once the machine is quiet); each
    kept row says which command and machine produced it."""
    if not path.is_file():
        return result
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return result
    if earlier.get("shape") != result["shape"] or earlier.get("weights_bytes") != result["weights_bytes"]:
        return result
    kept = [{"command": earlier.get("command"), "machine": earlier.get("machine"), **r}
            for r in earlier.get("rows", []) if r["step"].split()[0] not in steps]
    merged = {**result, "rows": kept + result["rows"]}
    if "bandwidth_gb_s" not in result and "bandwidth_gb_s" in earlier:
        merged["bandwidth_gb_s"] = earlier["bandwidth_gb_s"]
    return merged


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# {result['shape']} (synthetic bf16, {result['weights_bytes'] / 1e9:.1f} GB)", "",
             f"`{result['command']}` on {m['cpu']} ({m['cores']} cores), {m['date']}.", "",
             "| step | seconds | peak RSS (GiB) | decode tok/s | bytes/token (GB) | share of bandwidth | speedup (share of ideal) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"| {r['step']} | FAILED: {r['failed']} | | | | | |")
            continue
        tok = f"{r['decode_tok_s']:.2f}" if "decode_tok_s" in r else ""
        bpt = f"{r['bytes_per_token'] / 1e9:.2f}" if "bytes_per_token" in r else ""
        share = f"{100 * r['bandwidth_share']:.0f}%" if "bandwidth_share" in r else ""
        speed = f"{r['speedup']:.2f}x ({100 * r['share_of_ideal_speedup']:.0f}%)" if "speedup" in r else ""
        lines.append(f"| {r['step']} | {r['seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | {tok} | {bpt} | "
                     f"{share} | {speed} |")
    if "bandwidth_gb_s" in result:
        lines += ["", f"Measured read bandwidth: {result['bandwidth_gb_s']:.1f} GB/s."]
    earlier = {(r["command"], r["machine"]["date"] if r.get("machine") else "") for r in result["rows"]
               if r.get("command")}
    for command, date in sorted(earlier):
        steps = ", ".join(r["step"] for r in result["rows"] if r.get("command") == command)
        lines += ["", f"Rows {steps}: from an earlier run, `{command}` ({date})."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
