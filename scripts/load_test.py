"""Load test for `dejavu serve`: N concurrent streaming clients for a fixed time, dense and/or sparse.

Starts the server itself (one process per variant, on loopback), asks each prompt alone first (its
greedy single-request output), then runs the clients for --seconds: each sends greedy streaming
requests back to back, prompts in turn. Reports requests/s, tokens/s, latency percentiles, time
to first token, HTTP errors, and how many answers equal their prompt's single-request output
(dense: all must; sparse: the batch shares the union of its rows' units, so a batched answer may
legitimately differ from the answer alone).

  python scripts/load_test.py --clients 16 --seconds 30 --predictors runs/smollm2-135m/predictors \
      --out results/smollm2-135m/serve_load.md
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

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


async def one_request(client, model, prompt, max_tokens) -> dict:
    t0 = time.monotonic()
    first, text, tokens = None, "", 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.monotonic() - t0
            text += chunk.choices[0].text
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return dict(prompt=prompt, text=text, tokens=tokens, latency=time.monotonic() - t0, ttft=first)


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = (await client.models.list()).data[0].id
    single = {p: (await one_request(client, model, p, max_tokens))["text"] for p in PROMPTS}
    done, errors, stop_at = [], [], time.monotonic() + seconds

    async def worker(i: int):
        k = i
        while time.monotonic() < stop_at:  # every client stops by itself; requests in flight finish
            try:
                done.append(await one_request(client, model, PROMPTS[k % len(PROMPTS)], max_tokens))
            except openai.APIError as e:
                errors.append(f"{type(e).__name__}: {getattr(e, 'status_code', '')} {e}")
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
    return dict(requests=len(done), errors=errors, wall=wall, tokens=sum(r["tokens"] for r in done),
                matches=sum(r["text"] == single[r["prompt"]] for r in done),
                p50=pct(lat, 0.5), p95=pct(lat, 0.95), p99=pct(lat, 0.99), ttft50=pct(ttft, 0.5),
                ttft95=pct(ttft, 0.95), density=dens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (default 16)")
    ap.add_argument("--seconds", type=float, default=30, help="how long the clients keep sending (default 30)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per request (default 32)")
    ap.add_argument("--batch-size", type=int, default=8, help="the server's --batch-size (default 8)")
    ap.add_argument("--predictors", help="also run sparse with these predictors (dense always runs first)")
    ap.add_argument("--sparse-max-batch", type=int, default=None,
                    help="the sparse server's --sparse-max-batch (default: the batch size, so every step is sparse)")
    ap.add_argument("--sparse-only", action="store_true", help="skip the dense run")
    ap.add_argument("--out", help="append a markdown table here")
    args = ap.parse_args()
    base = ["--batch-size", str(args.batch_size), "--max-queue", str(max(64, args.clients))]
    variants = [] if args.sparse_only else [("dense", base)]
    if args.predictors:
        smb = args.sparse_max_batch or args.batch_size
        variants.append((f"sparse (MLP 0.5, heads 0.67; sparse up to {smb} rows)",
                         base + ["--sparse", "--predictors", args.predictors, "--sparse-max-batch", str(smb)]))
    rows = []
    for name, serve_args in variants:
        proc, url = start_server(serve_args)
        try:
            r = asyncio.run(load(url, args.clients, args.seconds, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        rows.append((name, r))
        print(f"{name}: {r['requests']} requests in {r['wall']:.1f} s, {r['requests'] / r['wall']:.2f} requests/s, "
              f"{r['tokens'] / r['wall']:.1f} tokens/s, latency p50 {r['p50']:.2f} s p95 {r['p95']:.2f} s "
              f"p99 {r['p99']:.2f} s, first token p50 {r['ttft50']:.2f} s p95 {r['ttft95']:.2f} s, "
              f"{len(r['errors'])} errors, {r['matches']}/{r['requests']} equal to the single-request output, "
              f"achieved density MLP {r['density']['mlp']:.3f} heads {r['density']['attn']:.3f}")
        for e in r["errors"][:5]:
            print("  error:", e)
    table = ["| variant | clients | requests | requests/s | tokens/s | latency p50 / p95 / p99 (s) | "
             "first token p50 / p95 (s) | errors | = single-request output | achieved density MLP / heads |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        table.append(f"| {name} | {args.clients} | {r['requests']} | {r['requests'] / r['wall']:.2f} | "
                     f"{r['tokens'] / r['wall']:.1f} | {r['p50']:.2f} / {r['p95']:.2f} / {r['p99']:.2f} | "
                     f"{r['ttft50']:.2f} / {r['ttft95']:.2f} | {len(r['errors'])} | {r['matches']}/{r['requests']} | "
                     f"{r['density']['mlp']:.3f} / {r['density']['attn']:.3f} |")
    cmd = "python " + " ".join(sys.argv)
    text = "\n".join(table) + (f"\n\n`{cmd}`; server `--batch-size {args.batch_size}`, {args.max_tokens} new tokens "
                               f"per request, greedy, streaming; {cpu_name()}\n")
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
