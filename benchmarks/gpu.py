"""GPU decode benchmark: shortrt's GPU engine (dense, 8 layers removed, 8 attentions removed) against
transformers with its static KV cache (which generate() then torch.compiles) on the same GPU.

    python benchmarks/gpu.py --out results/          # on a GPU machine (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu.py --dry-run --out /tmp/g  # the same code path on the CPU, tiny shapes

The weights are random, generated on the device (the default model's package is not on the GPU
machine; decode speed depends only on the shapes): the default model's shape (SmolLM2-135M: 30
layers, hidden 576) and an 8B-class shape (Llama-3-8B: 32 layers, hidden 4096). Each (shape, engine,
dtype) runs in its own worker process (harness.run_worker): a worker that crashes, hangs or runs out
of memory becomes failed rows and the run goes on; a row that fails inside a worker is recorded too.

Per row: decode step time (median over --steps replays of the step for the whole batch: host inputs
in, tokens out), tokens/s = batch / step time, end-to-end decode tokens/s through generate_ids, time
per executed layer, and the bytes one step reads (weights + KV) over the step time as a fraction of
the GPU's bandwidth, measured by a device-to-device copy (bytes read + written).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402

# name -> ModelConfig fields, layers removed in the pruned variants.
SHAPES = {
    "smollm2-135m": dict(architecture="LlamaForCausalLM", hidden=576, intermediate=1536, n_layers=30, n_heads=9,
                         n_kv_heads=3, head_dim=64, vocab=49152, max_position=8192, rms_eps=1e-5,
                         rope_theta=100000.0, tie_embeddings=True),
    "llama3-8b": dict(architecture="LlamaForCausalLM", hidden=4096, intermediate=14336, n_layers=32, n_heads=32,
                      n_kv_heads=8, head_dim=128, vocab=128256, max_position=8192, rms_eps=1e-5,
                      rope_theta=500000.0, tie_embeddings=False),
    "tiny": dict(architecture="LlamaForCausalLM", hidden=64, intermediate=128, n_layers=6, n_heads=4, n_kv_heads=2,
                 head_dim=16, vocab=256, max_position=256, rms_eps=1e-5, rope_theta=10000.0, tie_embeddings=True),
}
REMOVE = {"smollm2-135m": 8, "llama3-8b": 8, "tiny": 2}
VARIANTS = ("dense", "layers", "attention")  # 8 whole layers removed / 8 attentions removed
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}


def model_config(shape: str, n_layers: int | None = None):
    from shortrt.checkpoint import ModelConfig

    fields = dict(SHAPES[shape])
    if n_layers is not None:
        fields["n_layers"] = n_layers
    return ModelConfig(**fields)


def variant_plan(shape: str, variant: str):
    """The executed steps: the last-but-few layers lose their layer or their attention, as ShortGPT picks."""
    from shortrt.checkpoint import Step

    n, k = SHAPES[shape]["n_layers"], REMOVE[shape]
    removed = set(range(n - k - 2, n - 2))
    if variant == "dense":
        return tuple(Step(i) for i in range(n))
    if variant == "layers":
        return tuple(Step(i) for i in range(n) if i not in removed)
    return tuple(Step(i, attention=i not in removed) for i in range(n))


def random_reader(cfg, device, seed: int = 0):
    """read(name, dtype) -> a random tensor of the checkpoint's shape for that name, made on the device
    from a per-name seed (nothing is kept: the engine holds the only copy)."""
    import torch

    from shortrt.checkpoint import expected_tensors
    from shortrt.layermap import LayerMap

    shapes = expected_tensors(cfg, LayerMap.dense(cfg.n_layers))

    def read(name, dtype=None):
        shape = shapes[name]
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=dtype or torch.float32, device=device)
        g = torch.Generator(device=device).manual_seed(seed * 7919 + zlib.crc32(name.encode()))
        w = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        return w.to(dtype or torch.float32)

    return read


def device_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB, read + written (median of 10 after a warm-up)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    n = 2**28  # fp32 elements: 1 GiB
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n * 4 / statistics.median(times)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gpueng(eng, batch: int, prompt_tokens: int, steps: int, new_tokens: int) -> dict:
    """Step time of the decode step for `batch` sequences and end-to-end generate_ids decode rate."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    vocab = eng.cfg.vocab
    prompts = [rng.integers(3, vocab, prompt_tokens).tolist() for _ in range(batch)]
    stamps: list[float] = []
    eng.generate_ids(prompts, max_new_tokens=4, stop=[])  # warm-up: graphs captured, kernels compiled
    t0 = time.perf_counter()
    eng.generate_ids(prompts, max_new_tokens=new_tokens, stop=[],
                     callback=lambda seq, tok: stamps.append(time.perf_counter()) if seq == 0 else None)
    e2e = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    # The step alone: every row at position prompt_tokens (its KV filled by the run above).
    ints = np.array([[5] * batch, [prompt_tokens] * batch, list(range(batch)), [0] * batch], dtype=np.int64)
    floats = np.zeros((3, batch), dtype=np.float32)
    floats[1] = 1.0
    for _ in range(3):
        eng._decode(ints, floats)
    times = []
    for _ in range(steps):
        _sync(eng.device)
        t = time.perf_counter()
        _, nxt = eng._decode(ints, floats)
        int(torch.as_tensor(nxt)[0])  # the tokens on the host, as a real step needs them
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    cfg = eng.cfg
    kv_elem = eng.k_cache.element_size()
    kv_read = batch * 2 * eng.num_attention_layers * (prompt_tokens + 1) * cfg.n_kv_heads * cfg.head_dim * kv_elem
    bytes_per_step = eng.weight_bytes_per_token + kv_read
    return {"step_ms": step_s * 1e3, "tok_s": batch / step_s, "generate_tok_s": e2e, "layers": eng.num_layers,
            "attentions": eng.num_attention_layers, "layer_us": step_s * 1e6 / eng.num_layers,
            "bytes_per_step": bytes_per_step, "achieved_gb_s": bytes_per_step / step_s / 1e9,
            "weight_bytes": eng.weight_bytes, "cuda_graphs": eng.cuda_graphs, "graph_error": eng.graph_error,
            "ttft_ms": (stamps[0] - t0) * 1e3 if stamps else float("nan")}


def worker_gpueng(spec: dict) -> dict:
    """Every variant x batch of one (shape, dtype): rows, each its numbers or its error."""
    import torch

    from shortrt.gpu_engine import GpuEngine

    device = torch.device(spec["device"])
    bandwidth = device_bandwidth(device)
    rows = []
    for variant in spec["variants"]:
        cfg, plan = model_config(spec["shape"]), variant_plan(spec["shape"], variant)
        eng = None
        try:
            eng = GpuEngine.from_weights(cfg, plan, random_reader(cfg, device), device=spec["device"],
                                         dtype=spec["dtype"], max_seq=spec["context"], max_batch=max(spec["batches"]),
                                         backend=spec.get("backend", "auto"))
        except Exception as exc:  # e.g. out of memory: this variant's rows fail, the others run
            rows += [{"variant": variant, "batch": b, "failed": f"{type(exc).__name__}: {exc}"[:300]}
                     for b in spec["batches"]]
            continue
        for b in spec["batches"]:
            try:
                row = measure_gpueng(eng, b, spec["prompt_tokens"], spec["steps"], spec["new_tokens"])
                row["bandwidth_fraction"] = row["achieved_gb_s"] * 1e9 / bandwidth
                rows.append({"variant": variant, "batch": b, **row})
            except Exception as exc:
                rows.append({"variant": variant, "batch": b, "failed": f"{type(exc).__name__}: {exc}"[:300]})
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"rows": rows, "device_name": name, "copy_bandwidth": bandwidth}


def worker_transformers_gpu(spec: dict) -> dict:
    """transformers' generate with cache_implementation="static" (it then compiles the decoding
    forward with torch.compile, mode reduce-overhead, on CUDA): decode tok/s = batch * (N - 1) tokens
    over t(N new tokens) - t(1 new token)."""
    import torch
    import transformers

    device = torch.device(spec["device"])
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    rows = []
    for variant in spec["variants"]:
        n_layers = SHAPES[spec["shape"]]["n_layers"] - (REMOVE[spec["shape"]] if variant == "layers" else 0)
        c = model_config(spec["shape"], n_layers)
        config = transformers.LlamaConfig(
            vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.intermediate, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
            max_position_embeddings=c.max_position, rms_norm_eps=c.rms_eps, rope_theta=c.rope_theta,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = None
        try:
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            for b in spec["batches"]:
                ids = torch.randint(3, c.vocab, (b, spec["prompt_tokens"]), device=device)
                opts = dict(do_sample=False, cache_implementation="static", pad_token_id=0,
                            attention_mask=torch.ones_like(ids))

                def run(n):
                    _sync(device)
                    t = time.perf_counter()
                    with torch.inference_mode():
                        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **opts)
                    _sync(device)
                    return time.perf_counter() - t

                try:
                    run(spec["new_tokens"])  # compiles
                    run(spec["new_tokens"])
                    t_n = statistics.median(run(spec["new_tokens"]) for _ in range(2))
                    t_1 = statistics.median(run(1) for _ in range(2))
                    step_s = (t_n - t_1) / (spec["new_tokens"] - 1)
                    rows.append({"variant": variant, "batch": b, "step_ms": step_s * 1e3, "tok_s": b / step_s,
                                 "layers": n_layers,
                                 "compiled": getattr(model, "_compiled_call", None) is not None})
                except Exception as exc:
                    rows.append({"variant": variant, "batch": b, "failed": f"{type(exc).__name__}: {exc}"[:300]})
        except Exception as exc:
            rows += [{"variant": variant, "batch": b, "failed": f"{type(exc).__name__}: {exc}"[:300]}
                     for b in spec["batches"]]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


WORKERS = {"gpueng": worker_gpueng, "transformers-gpu": worker_transformers_gpu}  # run by harness.worker_main


# ----------------------------------------------------------------------------- driver

def jobs_for(args) -> list[dict]:
    """One worker per (shape, engine, dtype), most important first (a run cut short keeps those)."""
    jobs = []
    for shape in args.shapes:
        variants = list(VARIANTS) if shape != "llama3-8b" else ["dense", "layers"]
        for dtype in args.dtypes:
            jobs.append({"engine": "gpueng", "shape": shape, "dtype": dtype, "variants": variants})
        if "transformers" in args.peers:
            jobs.append({"engine": "transformers-gpu", "shape": shape, "dtype": "bf16", "variants": ["dense", "layers"]})
    return jobs


def table(rows: list[dict]) -> str:
    head = ("| engine | shape | dtype | variant | batch | layers | step ms | tok/s | generate tok/s | us/layer | "
            "GB/step | GB/s | of bandwidth | vs dense | vs transformers |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    dense = {(r["engine"], r["shape"], r["dtype"], r["batch"]): r.get("tok_s") for r in rows if r["variant"] == "dense"}
    hf = {(r["shape"], r["variant"], r["batch"]): r.get("tok_s") for r in rows if r["engine"] == "transformers-gpu"}

    def f(v, spec):
        return "-" if v is None or v != v else format(v, spec)

    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['engine']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['batch']} | "
                         f"FAILED: {r['failed'].splitlines()[0][:120]} |")
            continue
        d = dense.get((r["engine"], r["shape"], r["dtype"], r["batch"]))
        peer = hf.get((r["shape"], r["variant"] if r["variant"] != "attention" else None, r["batch"]))
        lines.append(
            f"| {r['engine']} | {r['shape']} | {r['dtype']} | {r['variant']} | {r['batch']} | {r.get('layers', '-')} | "
            f"{f(r.get('step_ms'), '.3f')} | {f(r.get('tok_s'), ',.0f')} | {f(r.get('generate_tok_s'), ',.0f')} | "
            f"{f(r.get('layer_us'), '.1f')} | {f((r.get('bytes_per_step') or float('nan')) / 1e9, '.3f')} | "
            f"{f(r.get('achieved_gb_s'), ',.0f')} | {f(r.get('bandwidth_fraction'), '.1%')} | "
            f"{f(r['tok_s'] / d if d else None, '.3f')} | "
            f"{f(r['tok_s'] / peer if peer and r['engine'] == 'gpueng' else None, '.2f')} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="folder for gpu.json and gpu.md (created)")
    p.add_argument("--dry-run", action="store_true",
                   help="the same code path on the CPU: tiny shape, torch kernels, few steps, transformers eager")
    p.add_argument("--shapes", default="smollm2-135m,llama3-8b", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--dtypes", default="bf16,int8", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--peers", default="transformers", type=lambda s: [x for x in s.split(",") if x])
    p.add_argument("--batches", default="1,8", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="timed replays of the decode step per row")
    p.add_argument("--context", type=int, default=512, help="max_seq of the KV cache")
    p.add_argument("--worker-timeout", type=float, default=240)
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole run: a worker gets at most what is left, and jobs not started by "
                        "then are recorded as failed rows (benchmarks/gpu_check.sh fits its time slot this way)")
    args = p.parse_args(argv)
    common = {"device": "cuda", "threads": 1, "module": "gpu", "context": args.context, "batches": args.batches,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "steps": args.steps}
    if args.dry_run:
        args.shapes = ["tiny"]
        common.update(device="cpu", backend="torch", context=64, prompt_tokens=8, new_tokens=4, steps=3,
                      batches=[1, 2])
    rows: list[dict] = []
    info: dict = {}
    started = time.time()
    result = {"command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": harness.machine(), "settings": {k: v for k, v in common.items() if k != "module"},
              "rows": rows, "info": info}
    for job in jobs_for(args):
        spec = {**common, **job}
        t = time.time()
        left = args.worker_timeout if args.deadline is None else min(args.worker_timeout, args.deadline - (t - started))
        print(f"gpu.py: {job['engine']} {job['shape']} {job['dtype']} ...", file=sys.stderr, flush=True)
        if left < 5:
            out = {"failed": f"not run: the run's --deadline of {args.deadline:g} s was reached", "stderr_tail": None}
        else:
            out = harness.run_worker(spec, left)
        base = {"engine": job["engine"], "shape": job["shape"], "dtype": job["dtype"]}
        if "failed" in out:  # the whole worker died: each of its rows failed for that reason
            rows += [{**base, "variant": v, "batch": b, "failed": out["failed"], "stderr_tail": out.get("stderr_tail")}
                     for v in job["variants"] for b in spec["batches"]]
        else:
            rows += [{**base, **r} for r in out["rows"]]
            info.update({k: out[k] for k in ("device_name", "copy_bandwidth") if k in out})
        print(f"gpu.py:   {time.time() - t:.0f} s", file=sys.stderr, flush=True)
        result["seconds"] = time.time() - started
        _save(args.out, result)
    name = info.get("device_name", "")
    nominal = next((bw for key, bw in NOMINAL_BANDWIDTH.items() if key in name), None)
    info["nominal_bandwidth"] = nominal
    md = (f"GPU: {name or '?'}; device-to-device copy {info.get('copy_bandwidth', float('nan')) / 1e9:,.0f} GB/s "
          f"(read + written){f', nominal {nominal / 1e9:,.0f} GB/s' if nominal else ''}. Random weights; prompt "
          f"{common['prompt_tokens']} tokens; step = one decode step for the whole batch (host in, tokens out).\n\n"
          + table(rows))
    print(md)
    _save(args.out, result, md)
    return result


def _save(out: Path | None, result: dict, md: str | None = None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    if md is not None:
        (out / "gpu.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
