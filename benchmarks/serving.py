"""Serving throughput and latency: `shortrt serve` (and llama.cpp's llama-server) under N streaming clients.

Each server runs as its own process on 127.0.0.1 and is driven by one asyncio load generator in
this process (httpx, OpenAI streaming /v1/completions, the same requests for every server): N
concurrent clients (1, 2, 4, 8, 16), each sending its requests back to back, every request a
distinct 128-token prompt (as token ids, so every server sees the same tokens) and 128 new
tokens, greedy, end-of-sequence ignored. Reported per server and N: aggregate output tokens/s,
time to first token p50/p95, inter-token latency p50/p95 (gaps between streamed chunks), and the
load generator's own CPU time (it shares the cores with the server).

Beside them: the in-process baseline (`Engine.generate_ids` at batch 1 in a fresh process, same
prompts) for the "no serving tax" ratio, and the continuous-batching probe: with 7 requests
decoding, an 8th request's time to first token against the same request on an idle server, and
the longest gap the 7 streams see against their median gap.

Servers: shortrt fp32 and int8, dense and with 8 of 30 layers removed (shortgpt; the pruned
checkpoint comes from benchmarks/latency.py's cache); llama-server on the same model as GGUF when
`--llama-server PATH` is given (F32 and Q8_0 made by llama-cpp-python or the llama-quantize
beside the binary, else the packaged Q4_1). A server that fails to start or dies becomes a failed
row and the run goes on.

    python benchmarks/serving.py --quick        # ~2 minutes
    python benchmarks/serving.py --json benchmarks/results/serving.json --md benchmarks/results/serving.md \\
        --png benchmarks/results/serving.png [--llama-server ~/llama.cpp/build/bin/llama-server]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness
from harness import shown_path

HERE = Path(__file__).resolve().parent
MODEL_NAME = "bench"  # the id every server is started with and every request names
PROBE_RUNNING = 7  # requests decoding when the probe's 8th arrives


# ----------------------------------------------------------------------------- server processes

class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server started as a subprocess, its output in a log file, ready once /health is 200."""

    def __init__(self, command: list[str], port: int, log_path: Path, threads: int):
        self.command, self.port, self.log_path = command, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def tail(self, n: int = harness.STDERR_TAIL_LINES) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").rstrip().splitlines()[-n:])

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            raise ServerFailed(f"the server exited ({why})")

    def wait_ready(self, timeout_s: float) -> float:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout_s:
            self.check_alive()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise ServerFailed(f"not ready after {timeout_s:g} s")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def shortrt_command(job: dict, port: int, args) -> list[str]:
    return [sys.executable, "-m", "shortrt", "serve", job["path"], "--port", str(port), "--dtype", job["dtype"],
            "--threads", str(args.threads), "--max-batch", str(max(args.concurrency_list + [PROBE_RUNNING + 1])),
            "--max-queue", "64", "--max-seq", str(args.context), "--model-name", MODEL_NAME,
            "--log-level", "warning"]


def llama_command(job: dict, port: int, args) -> list[str]:
    slots = max(args.concurrency_list + [PROBE_RUNNING + 1])
    return [args.llama_server, "-m", job["path"], "--host", "127.0.0.1", "--port", str(port),
            "-t", str(args.threads), "-tb", str(args.threads), "-c", str(args.context * slots), "-np", str(slots),
            "--alias", MODEL_NAME]


def llama_ggufs(binary: str) -> tuple[dict[str, Path], str]:
    """{type: dense GGUF} for llama-server and a note on where they came from."""
    from shortrt.checkpoint import cache_dir, default_gguf_path

    try:
        return harness.llamacpp_ggufs(("F32", "Q8_0")), "F32/Q8_0 re-quantized by llama-cpp-python"
    except ImportError:
        pass
    quantize = Path(binary).with_name("llama-quantize")
    src = default_gguf_path()
    if quantize.is_file():
        out = {}
        for kind in ("F32", "Q8_0"):
            dst = cache_dir() / "bench" / "gguf" / f"{src.stem.split('.')[0]}-{kind}.gguf"
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_suffix(".tmp")
                subprocess.run([str(quantize), "--allow-requantize", str(src), str(tmp), kind, "2"], check=True,
                               capture_output=True)
                tmp.rename(dst)
            out[kind] = dst
        return out, f"F32/Q8_0 re-quantized by {quantize.name}"
    return {"Q4_1": src}, "the packaged Q4_1 GGUF (no llama-cpp-python or llama-quantize to re-quantize it)"


# ----------------------------------------------------------------------------- the load generator

def percentile(values, q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    v = sorted(values)
    return v[max(0, math.ceil(q / 100 * len(v)) - 1)]


async def stream_request(client, prompt: list[int], new_tokens: int, on_chunk=None) -> dict:
    """One streaming completion: its start, the arrival time of every text chunk, its token count."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "cache_prompt": False, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise ServerFailed(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise ServerFailed(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.perf_counter())
                if on_chunk is not None:
                    on_chunk(stamps[-1])
    if not stamps:
        raise ServerFailed("a request streamed no text")
    return {"t0": t0, "stamps": stamps, "end": time.perf_counter(), "tokens": tokens or len(stamps)}


def summarize(requests: list[dict], wall_s: float) -> dict:
    ttft = [1e3 * (r["stamps"][0] - r["t0"]) for r in requests]
    gaps = [1e3 * (b - a) for r in requests for a, b in zip(r["stamps"], r["stamps"][1:])]
    return {"requests": len(requests), "output_tokens": sum(r["tokens"] for r in requests),
            "output_tok_s": sum(r["tokens"] for r in requests) / wall_s, "wall_s": wall_s,
            "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
            "itl_ms_p50": percentile(gaps, 50) if gaps else None, "itl_ms_p95": percentile(gaps, 95) if gaps else None}


async def drive(url: str, prompts: list[list[int]], clients: int, per_client: int, new_tokens: int) -> dict:
    """`clients` concurrent streaming clients, each sending `per_client` requests back to back."""
    import httpx

    cpu0, t0 = time.process_time(), time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def one_client(c: int) -> list[dict]:
            return [await stream_request(client, prompts[(c * per_client + i) % len(prompts)], new_tokens)
                    for i in range(per_client)]
        done = await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    out = summarize([r for rs in done for r in rs], wall)
    out.update(clients=clients, generator_cpu_s=time.process_time() - cpu0)
    out["generator_cpu_share"] = out["generator_cpu_s"] / wall
    return out


async def probe(url: str, prompts: list[list[int]], long_tokens: int) -> dict:
    """The continuous-batching probe: the 8th request's TTFT with 7 decoding against on an idle
    server (median of 3), and the 7 streams' longest gap while the 8th was prefilled against
    their median gap before it arrived."""
    import httpx

    late = prompts[-1]
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0)) as client:
        idle = [await stream_request(client, late, 4) for _ in range(3)]
        ttft_idle = statistics.median(r["stamps"][0] - r["t0"] for r in idle)
        stamps: list[list[float]] = [[] for _ in range(PROBE_RUNNING)]
        running = [asyncio.ensure_future(stream_request(client, prompts[i], long_tokens, stamps[i].append))
                   for i in range(PROBE_RUNNING)]
        async def wait_for_tokens(n: int) -> float:
            while min(len(s) for s in stamps) < n:
                for task in running:
                    if task.done():
                        task.result()  # a failure surfaces here; a normal end means long_tokens is too small
                        raise ServerFailed("a probe stream ended before the 8th request was sent")
                await asyncio.sleep(0.005)
            return time.perf_counter()
        try:
            steady = await wait_for_tokens(4)  # all 7 prefilled and decoding
            await wait_for_tokens(12)  # the gaps of plain decoding, for the median
            eighth = await stream_request(client, late, 4)
            await asyncio.sleep(0.2)  # a few more tokens of the 7 after the 8th's first one
        finally:
            for task in running:
                task.cancel()  # a disconnect: the server cancels them
            await asyncio.gather(*running, return_exceptions=True)
    start, first = eighth["t0"], eighth["stamps"][0]
    before = [b - a for s in stamps for a, b in zip(s, s[1:]) if a >= steady and b <= start]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > start and a < first]
    ttft_busy = first - start
    out = {"ttft_idle_ms": 1e3 * ttft_idle, "ttft_busy_ms": 1e3 * ttft_busy, "ttft_ratio": ttft_busy / ttft_idle}
    if before and during:
        out.update(gap_median_ms=1e3 * statistics.median(before), gap_max_during_ms=1e3 * max(during),
                   gap_ratio=max(during) / statistics.median(before))
    return out


# ----------------------------------------------------------------------------- the in-process baseline

def worker_inprocess(spec: dict) -> dict:
    """Engine.generate_ids at batch 1 on the same prompts, TTFT and ITL as the clients measure them."""
    from shortrt.engine import Engine

    eng = Engine(spec["path"], dtype=spec["dtype"], threads=spec["threads"], max_seq=spec["context"])
    run = harness.shortrt_run(eng)
    run(spec["prompts"][0][:8], 8)  # warm-up
    requests = []
    for prompt in spec["prompts"]:
        t0, stamps = run(prompt, spec["new_tokens"])
        requests.append({"t0": t0, "stamps": stamps, "end": stamps[-1], "tokens": len(stamps)})
    wall = sum(r["end"] - r["t0"] for r in requests)  # one client: requests back to back
    return summarize(requests, wall)


def run_inprocess(spec: dict, timeout_s: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout_s:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.rstrip().splitlines()[-harness.STDERR_TAIL_LINES:])
        return {"failed": f"exit code {proc.returncode}", "stderr_tail": tail}
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------- the run

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--remove", type=int, default=8, help="layers removed in the pruned rows (default %(default)s)")
    p.add_argument("--scores", default=str(HERE / "results" / "calibration" / "scores.json"),
                   help="calibration scores to select the layers with (as latency.py)")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--dtypes", default="fp32,int8", help="shortrt weight formats (default %(default)s)")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="client counts (default %(default)s)")
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends back to back")
    p.add_argument("--rounds", type=int, default=2, help="sweeps per server; medians are reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary (rows skipped without it)")
    p.add_argument("--no-probe", action="store_true", help="skip the continuous-batching probe")
    p.add_argument("--server-timeout", type=float, default=900, help="seconds one server may take, start to stop")
    p.add_argument("--quick", action="store_true", help="1, 4 and 8 clients, 32 new tokens, one round")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--md", help="write the markdown report here")
    p.add_argument("--png", help="write the throughput chart here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.new_tokens, args.rounds, args.per_client = "1,4,8", 32, 1, 1
    args.concurrency_list = sorted({int(x) for x in args.concurrency.split(",")})
    args.context = args.prompt_tokens + max(args.new_tokens, 4 * 32) * 2  # room for the probe's long streams
    return args


def make_jobs(args, ckpts: dict) -> tuple[list[dict], list[str]]:
    """One job per server: shortrt per dtype x (dense, pruned), then llama-server's."""
    notes = []
    jobs = [{"label": f"shortrt {dtype}", "engine": "shortrt", "dtype": dtype, "variant": variant,
             "removed": k, "path": ckpts[variant]}
            for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]
            for variant, k in (("dense", 0), ("shortgpt", args.remove))]
    if not args.llama_server:
        notes.append("llama-server: no --llama-server PATH given; its rows are skipped")
    elif not Path(args.llama_server).is_file():
        notes.append(f"llama-server: {args.llama_server} does not exist; its rows are skipped")
    else:
        ggufs, where = llama_ggufs(args.llama_server)
        notes.append(f"llama-server GGUFs: {where}")
        for kind, gguf in ggufs.items():
            for variant, k in (("dense", 0), ("shortgpt", args.remove)):
                path = gguf if not k else harness.pruned_gguf(gguf, ckpts[variant])
                if path is not None:
                    jobs.append({"label": f"llama-server {kind}", "engine": "llama-server", "dtype": kind,
                                 "variant": variant, "removed": k, "path": str(path)})
    return jobs, notes


def run_server(job: dict, args, prompts: list[list[int]], log_dir: Path, probe_it: bool, baseline=None) -> dict:
    """Start the server, sweep the client counts `rounds` times, probe, stop. Never raises: a
    failure becomes the row's "failed" with the tail of the server's log. baseline() (the
    in-process run, a dict) is called after each sweep, while the server sits idle, so that
    both see the same load on a shared machine; its rounds' medians go to row["inprocess"]."""
    port = free_port()
    command = shortrt_command(job, port, args) if job["engine"] == "shortrt" else llama_command(job, port, args)
    server = ServerProcess(command, port, log_dir / f"{job['label'].replace(' ', '-')}-{job['variant']}.log",
                           args.threads)
    deadline = time.monotonic() + args.server_timeout
    out = dict(job)
    try:
        out["startup_s"] = server.wait_ready(min(300.0, args.server_timeout))
        asyncio.run(drive(server.url, prompts, 1, 1, 8))  # warm-up: page in the weights
        sweeps: dict[int, list[dict]] = {n: [] for n in args.concurrency_list}
        baselines = []
        for _ in range(args.rounds):
            for n in args.concurrency_list:
                if time.monotonic() > deadline:
                    raise ServerFailed(f"ran past --server-timeout {args.server_timeout:g} s")
                sweeps[n].append(asyncio.run(drive(server.url, prompts, n, args.per_client, args.new_tokens)))
                server.check_alive()
            if baseline is not None:
                baselines.append(baseline())
        out["by_clients"] = {str(n): medians(runs) for n, runs in sweeps.items()}
        if baselines:
            good = [b for b in baselines if "failed" not in b]
            out["inprocess"] = medians(good) if good else baselines[0]
        if probe_it:
            out["probe"] = asyncio.run(probe(server.url, prompts, args.context - args.prompt_tokens))
    except (ServerFailed, OSError, ValueError) as exc:
        out["failed"] = str(exc)
        out["stderr_tail"] = server.tail()
    except Exception as exc:  # e.g. the connection dropped when the server crashed
        out["failed"] = f"{type(exc).__name__}: {exc}"
        out["stderr_tail"] = server.tail()
    finally:
        out["exit_code"] = server.stop()
    return out


def medians(runs: list[dict]) -> dict:
    """Per key, the median over runs of a float, else the first run's value."""
    return {k: statistics.median(r[k] for r in runs) if isinstance(runs[0][k], float) else runs[0][k]
            for k in runs[0]}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker_inprocess(json.loads(args.worker))), flush=True)
        return
    import latency  # its pruned checkpoints (made once, cached)
    import shortrt
    from shortrt.checkpoint import cache_dir
    from shortrt.data import heldout_texts

    dense = shortrt.load(args.model)
    pruned = latency.pruned_checkpoints(args.model, [("shortgpt", args.remove)], args.scores, args.calib_tokens)
    ckpts = {"dense": str(dense.path), "shortgpt": pruned[("shortgpt", args.remove)]}
    n_prompts = max(max(args.concurrency_list) * args.per_client, PROBE_RUNNING + 1)
    ids = harness.prompt_ids(dense.path, n_prompts * args.prompt_tokens, heldout_texts())
    prompts = [ids[i * args.prompt_tokens:(i + 1) * args.prompt_tokens] for i in range(n_prompts)]
    jobs, notes = make_jobs(args, ckpts)
    log_dir = cache_dir() / "bench" / "serving-logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for job in jobs:
        probe_it = not args.no_probe and job["variant"] == "dense" and job["dtype"] in ("fp32", "F32", "Q4_1")
        print(f"{job['label']} {job['variant']}: serving...", file=sys.stderr, flush=True)
        baseline = None
        if job["engine"] == "shortrt":
            spec = {"path": job["path"], "dtype": job["dtype"], "threads": args.threads, "context": args.context,
                    "new_tokens": args.new_tokens, "prompts": prompts[:max(2, args.per_client)]}
            baseline = lambda spec=spec: run_inprocess(spec, args.server_timeout)  # noqa: E731
        row = run_server(job, args, prompts, log_dir, probe_it, baseline)
        if "failed" in row:
            print(f"{job['label']} {job['variant']}: FAILED ({row['failed']})", file=sys.stderr, flush=True)
        row["path"] = shown_path(row["path"])
        rows.append(row)

    md = render_markdown(rows, args, dense, notes)
    print(md)
    shown = harness.shown_args(args, ("scores", "json", "md", "png", "llama_server"))
    result = {"machine": harness.machine(), "args": shown, "notes": notes, "rows": rows}
    harness.save_report(args, result, md, rows, plot)


# ----------------------------------------------------------------------------- the report

def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def render_markdown(rows: list[dict], args, dense, notes: list[str]) -> str:
    lines = [
        f"Model `{dense.name}`, {args.threads} threads, prompts of {args.prompt_tokens} tokens (distinct, as "
        f"token ids), {args.new_tokens} new tokens, greedy, end of sequence ignored; each of N clients sends "
        f"{args.per_client} streaming requests back to back; medians of {args.rounds} sweep(s). The load generator "
        "runs on the same cores: its CPU time is the last column. ITL = gap between streamed chunks.",
        "",
        "| server | variant | clients | output tok/s | vs 1 client | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | generator CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['label']} | {r['variant']} | - | FAILED: {r['failed']} |" + " - |" * 6)
            continue
        one = r["by_clients"][str(args.concurrency_list[0])]["output_tok_s"]
        for n, m in r["by_clients"].items():
            lines.append(f"| {r['label']} | {r['variant']} | {n} | {m['output_tok_s']:.1f} | "
                         f"{m['output_tok_s'] / one:.2f}× | {_ms(m['ttft_ms_p50'])} | {_ms(m['ttft_ms_p95'])} | "
                         f"{_ms(m['itl_ms_p50'])} | {_ms(m['itl_ms_p95'])} | {m['generator_cpu_share']:.0%} |")
    good = {(r["label"], r["variant"]): r for r in rows if "failed" not in r}
    lines += ["", "No serving tax — the server with 1 client against `Engine.generate_ids` in a fresh process "
                  "(same prompts, batch 1; run after each sweep while the server sat idle):", "",
              "| server | variant | server tok/s | in-process tok/s | ratio | server TTFT ms | in-process TTFT ms | "
              "server ITL p50 ms | in-process ITL p50 ms |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in good.values():
        base = r.get("inprocess")
        if not base or "1" not in r["by_clients"]:
            continue
        if "failed" in base:
            lines.append(f"| {r['label']} | {r['variant']} | - | FAILED: {base['failed']} |" + " - |" * 5)
            continue
        s = r["by_clients"]["1"]
        lines.append(f"| {r['label']} | {r['variant']} | {s['output_tok_s']:.1f} | {base['output_tok_s']:.1f} | "
                     f"{s['output_tok_s'] / base['output_tok_s']:.2f}× | {_ms(s['ttft_ms_p50'])} | "
                     f"{_ms(base['ttft_ms_p50'])} | {_ms(s['itl_ms_p50'])} | {_ms(base['itl_ms_p50'])} |")
    lines += ["", "Ratios measured in this run (output tok/s):", ""]
    for (label, variant), r in good.items():
        if variant == "dense":
            continue
        base = good.get((label, "dense"))
        if base:
            per = ", ".join(f"{n}: {m['output_tok_s'] / base['by_clients'][n]['output_tok_s']:.2f}×"
                            for n, m in r["by_clients"].items() if n in base["by_clients"])
            lines.append(f"- {label} {variant} −{r['removed']} / dense, by clients: {per}")
    for ours, theirs in (("shortrt fp32", "llama-server F32"), ("shortrt int8", "llama-server Q8_0")):
        for variant in ("dense", "shortgpt"):
            a, b = good.get((ours, variant)), good.get((theirs, variant))
            if a and b:
                per = ", ".join(f"{n}: {m['output_tok_s'] / b['by_clients'][n]['output_tok_s']:.2f}×"
                                for n, m in a["by_clients"].items() if n in b["by_clients"])
                lines.append(f"- {ours} / {theirs}, {variant}, by clients: {per}")
    probes = [(r, r["probe"]) for r in good.values() if "probe" in r]
    if probes:
        lines += ["", f"Continuous batching probe ({PROBE_RUNNING} requests decoding, then an 8th with the same "
                      f"{args.prompt_tokens}-token prompt as on the idle server):", "",
                  "| server | variant | 8th TTFT idle ms | 8th TTFT busy ms | busy / idle | median gap of the 7, ms | "
                  "longest gap during the 8th's prefill, ms | longest / median |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r, p in probes:
            lines.append(f"| {r['label']} | {r['variant']} | {_ms(p['ttft_idle_ms'])} | {_ms(p['ttft_busy_ms'])} | "
                         f"{p['ttft_ratio']:.2f}× | {_ms(p.get('gap_median_ms'))} | "
                         f"{_ms(p.get('gap_max_during_ms'))} | "
                         + (f"{p['gap_ratio']:.1f}× |" if "gap_ratio" in p else "- |"))
    failed = [r for r in rows if "failed" in r]
    if failed or notes:
        lines += [""] + [f"- {n}" for n in notes]
    for r in failed:
        tail = "\n".join("    " + ln for ln in (r.get("stderr_tail") or "(no output)").splitlines())
        lines += ["", f"{r['label']} {r['variant']}: FAILED: {r['failed']}; last lines of its log:", "", "```",
                  tail, "```"]
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Aggregate output tokens/s against clients, one line per server and variant; the
    in-process batch-1 baseline as a star at 1 client."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, r in enumerate(rows):
        color = plt.cm.tab10(i % 10)
        ns = sorted(int(n) for n in r["by_clients"])
        style = "-" if r["variant"] == "dense" else "--"
        name = f"{r['label']} {r['variant']}" + (f" −{r['removed']}" if r["removed"] else "")
        ax1.plot(ns, [r["by_clients"][str(n)]["output_tok_s"] for n in ns], style, marker="o", color=color, label=name)
        ax2.plot(ns, [r["by_clients"][str(n)]["ttft_ms_p50"] for n in ns], style, marker="o", color=color, label=name)
        base = r.get("inprocess")
        if base and "failed" not in base:
            ax1.plot([1], [base["output_tok_s"]], marker="*", markersize=12, color=color, linestyle="none")
    ax1.set(xscale="log", xlabel="concurrent streaming clients", ylabel="aggregate output tokens/s",
            title="Throughput (star: in-process Engine, batch 1)")
    ax2.set(xscale="log", xlabel="concurrent streaming clients", ylabel="time to first token p50 (ms)",
            title="Time to first token")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({int(n) for r in rows for n in r["by_clients"]}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
