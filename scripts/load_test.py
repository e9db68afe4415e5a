"""Load test for `dejavu serve`: N concurrent streaming clients for a fixed time, dense and/or sparse.

Starts the server itself (one process per variant, on loopback), asks each prompt alone first (its
greedy single-request output), then runs the clients for --seconds: each sends greedy streaming
requests back to back, prompts in turn. Reports requests/s, tokens/s, latency percentiles, time
to first token, HTTP errors, and how many answers equal their prompt's single-request output
(on a GPU all must, sparse too: each row selects its own units; on the CPU a sparse batch shares
the union of its rows' units, so a batched answer may legitimately differ from the answer alone).

  python scripts/load_test.py --clients 16 --seconds 30 --predictors runs/smollm2-135m/predictors \
      --out results/smollm2-135m/serve_load.md
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The first president of the United States",
           "Once upon a time, in a small village,", "The chemical symbol for gold is", "def fibonacci(n):",
           "The largest planet in the solar system is", "In 1492, Columbus"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dejavu", "serve", "--port", str(port), *serve_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    while time.monotonic() - t < 300:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    sys.exit("the server did not come up in 300 s")


async def one_request(client: httpx.AsyncClient, model, prompt, max_tokens) -> dict:
    """One greedy streaming completion (server-sent events, read as they come)."""
    t0 = time.monotonic()
    first, text, tokens = None, "", 0
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, ignore_eos=True)
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("choices"):
                first = first or time.monotonic() - t0
                text += chunk["choices"][0].get("text") or ""
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return dict(prompt=str(prompt), text=text, tokens=tokens, latency=time.monotonic() - t0, ttft=first)


def request_pool(args) -> list[tuple[str | list[int], int]]:
    """What the clients send, in turn: the text prompts with --max-tokens, or (--mixed) --pool
    token-id prompts of random lengths and new-token counts from the given ranges (seeded)."""
    if not args.mixed:
        return [(p, args.max_tokens) for p in PROMPTS]
    rng = random.Random(0)
    lo, hi = args.prompt_range
    out_lo, out_hi = args.output_range
    return [([rng.randrange(100, 30000) for _ in range(rng.randint(lo, hi))], rng.randint(out_lo, out_hi))
            for _ in range(args.pool)]


async def load(url: str, clients_list: list[int], seconds: float, pool) -> list[dict]:
    client = httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None))
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    single = {str(p): (await one_request(client, model, p, n))["text"] for p, n in pool}  # each request alone
    results = []
    for clients in clients_list:
        done, errors, sent, stop_at = [], [], [0], time.monotonic() + seconds

        async def worker(i: int):
            k = i
            while time.monotonic() < stop_at:  # every client stops by itself; requests in flight finish
                prompt, n = pool[k % len(pool)]
                sent[0] += 1
                try:
                    done.append(await one_request(client, model, prompt, n))
                except (RuntimeError, httpx.HTTPError) as e:
                    errors.append(f"{type(e).__name__}: {e}")
                k += 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.monotonic() - t0
        metrics = httpx.get(url + "/metrics").text
        dens = {part: next((float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith(f'dejavu_achieved_density{{part="{part}"}}')), None)
                for part in ("mlp", "attn")}
        lat, ttft = sorted(r["latency"] for r in done), sorted(r["ttft"] for r in done if r["ttft"] is not None)
        pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
        results.append(dict(clients=clients, requests=len(done), errors=errors, lost=sent[0] - len(done) - len(errors),
                            wall=wall, tokens=sum(r["tokens"] for r in done),
                            matches=sum(r["text"] == single[r["prompt"]] for r in done),
                            p50=pct(lat, 0.5), p95=pct(lat, 0.95), p99=pct(lat, 0.99), ttft50=pct(ttft, 0.5),
                            ttft95=pct(ttft, 0.95), ttft99=pct(ttft, 0.99), density=dens,
                            step_modes=[line for line in metrics.splitlines() if line.startswith("dejavu_step_")]))
    return results


def card_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return cpu_name()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="16", help="concurrent streaming clients, or several runs: 16,64 (default 16)")
    ap.add_argument("--seconds", type=float, default=30, help="how long the clients keep sending (default 30)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per text request (default 32)")
    ap.add_argument("--mixed", action="store_true",
                    help="token-id prompts of mixed lengths (--prompt-range) and outputs (--output-range) instead")
    ap.add_argument("--prompt-range", type=lambda v: tuple(map(int, v.split(","))), default=(32, 1024))
    ap.add_argument("--output-range", type=lambda v: tuple(map(int, v.split(","))), default=(16, 256))
    ap.add_argument("--pool", type=int, default=12, help="distinct mixed requests (default 12)")
    ap.add_argument("--batch-size", type=int, default=8, help="the server's --batch-size (default 8)")
    ap.add_argument("--serve-args", default="", help="more arguments for every server (e.g. '--model opt-30b "
                    "--tokenizer DIR')")
    ap.add_argument("--predictors", help="also run sparse with these predictors (dense always runs first)")
    ap.add_argument("--sparse-args", default="--mlp-density 0.5 --attn-density 0.67",
                    help="the sparse server's densities (default '--mlp-density 0.5 --attn-density 0.67')")
    ap.add_argument("--sparse-max-batch", type=int, default=None,
                    help="the CPU sparse server's --sparse-max-batch (e.g. the batch size, so every step is sparse; "
                         "a GPU server takes none)")
    ap.add_argument("--sparse-only", action="store_true", help="skip the dense run")
    ap.add_argument("--shape", default=None, help="the name the JSON rows give the model (default: from --serve-args)")
    ap.add_argument("--out", help="append a markdown table here")
    ap.add_argument("--json", help="merge the rows into this JSON list (rows of the same shape and command 'serve' "
                                   "are replaced)")
    args = ap.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    base = ["--batch-size", str(args.batch_size), "--max-queue", str(max(64, max(clients_list)))] + \
        shlex.split(args.serve_args)
    variants = [] if args.sparse_only else [("dense", base)]
    if args.predictors:
        smb = args.sparse_max_batch
        variants.append((f"sparse ({args.sparse_args.replace('--', '').strip()}"
                         + (f"; sparse up to {smb} rows)" if smb else ")"),
                         base + ["--sparse", "--predictors", args.predictors] + shlex.split(args.sparse_args)
                         + (["--sparse-max-batch", str(smb)] if smb else [])))
    pool, card = request_pool(args), card_name()
    rows = []
    for name, serve_args in variants:
        proc, url = start_server(serve_args)
        try:
            results = asyncio.run(load(url, clients_list, args.seconds, pool))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        for r in results:
            rows.append((name, r))
            d = r["density"]
            print(f"{name}, {r['clients']} clients: {r['requests']} requests in {r['wall']:.1f} s, "
                  f"{r['requests'] / r['wall']:.2f} requests/s, {r['tokens'] / r['wall']:.1f} tokens/s, latency p50 "
                  f"{r['p50']:.2f} s p95 {r['p95']:.2f} s p99 {r['p99']:.2f} s, first token p50 {r['ttft50']:.2f} s "
                  f"p99 {r['ttft99']:.2f} s, {len(r['errors'])} errors, {r['lost']} lost, {r['matches']}/"
                  f"{r['requests']} equal to the request alone, achieved density MLP {d['mlp']:.3f} heads "
                  f"{d['attn']:.3f}", flush=True)
            for line in r["step_modes"]:
                print("  " + line)
            for e in r["errors"][:5]:
                print("  error:", e)
    table = ["| variant | clients | requests | requests/s | tokens/s | latency p50 / p95 / p99 (s) | "
             "first token p50 / p95 / p99 (s) | errors | lost | = request alone | achieved density MLP / heads |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        table.append(f"| {name} | {r['clients']} | {r['requests']} | {r['requests'] / r['wall']:.2f} | "
                     f"{r['tokens'] / r['wall']:.1f} | {r['p50']:.2f} / {r['p95']:.2f} / {r['p99']:.2f} | "
                     f"{r['ttft50']:.2f} / {r['ttft95']:.2f} / {r['ttft99']:.2f} | {len(r['errors'])} | {r['lost']} | "
                     f"{r['matches']}/{r['requests']} | {r['density']['mlp']:.3f} / {r['density']['attn']:.3f} |")
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    what = (f"token-id prompts of {args.prompt_range[0]}-{args.prompt_range[1]} tokens and {args.output_range[0]}-"
            f"{args.output_range[1]} new tokens ({args.pool} requests in turn)" if args.mixed
            else f"{args.max_tokens} new tokens per request")
    text = "\n".join(table) + (f"\n\n`{cmd}`; server `--batch-size {args.batch_size}`, {what}, greedy, streaming, "
                               f"{args.seconds:g} s per run; {card}\n")
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")
    if args.json:
        shape = args.shape or \
            (base[base.index("--model") + 1] if "--model" in base else "smollm2-135m")
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        old = [r for r in old if not (r.get("shape") == shape and r.get("command") == "serve")]
        new = [dict(shape=shape, command="serve", variant=name.split(" ")[0], clients=r["clients"],
                    requests=r["requests"], tokens_per_s=r["tokens"] / r["wall"], requests_per_s=r["requests"] / r["wall"],
                    latency_p50_s=r["p50"], latency_p99_s=r["p99"], ttft_p50_s=r["ttft50"], ttft_p99_s=r["ttft99"],
                    errors=len(r["errors"]), lost=r["lost"], equal_to_alone=r["matches"], card=card,
                    argv=cmd) for name, r in rows]
        path.write_text(json.dumps(old + new, indent=1) + "\n")


if __name__ == "__main__":
    main()
