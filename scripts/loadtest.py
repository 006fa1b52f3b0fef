#!/usr/bin/env python3
"""Bounded closed-loop load test of a running embedding server on loopback.

For each concurrency, that many clients send `POST /embed` one request after
another for a fixed time; the script reports requests/s, embeddings/s and the
p50/p99 latency of successful requests, and counts the rest by status.

    python3 scripts/loadtest.py --url http://127.0.0.1:8080 --concurrency 1,8,32 --seconds 10

Only loopback URLs are accepted, and every run stops by itself.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


def client(host, port, body, stop_at, latencies, statuses, lock):
    conn = http.client.HTTPConnection(host, port, timeout=60)
    while time.monotonic() < stop_at:
        started = time.monotonic()
        try:
            conn.request("POST", "/embed", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=60)
            status = "error"
        elapsed = time.monotonic() - started
        with lock:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(elapsed)
    conn.close()


def run(host, port, concurrency, seconds, inputs):
    body = json.dumps({"inputs": [SENTENCE] * inputs if inputs > 1 else SENTENCE})
    latencies, statuses, lock = [], {}, threading.Lock()
    started = time.monotonic()
    stop_at = started + seconds
    threads = [
        threading.Thread(target=client, args=(host, port, body, stop_at, latencies, statuses, lock))
        for _ in range(concurrency)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    latencies.sort()
    ok = len(latencies)

    def pct(p):
        return latencies[min(ok - 1, int(p * ok))] * 1000 if ok else float("nan")

    return {
        "concurrency": concurrency,
        "requests_per_s": ok / wall,
        "embeddings_per_s": ok * inputs / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if ok else float("nan"),
        "other": {str(k): v for k, v in statuses.items() if k != 200},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--inputs", type=int, default=1, help="inputs per request")
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    url = urllib.parse.urlparse(args.url)
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("only loopback targets are allowed")
    if not 0 < args.seconds <= 120:
        raise SystemExit("--seconds must be in (0, 120]")
    port = url.port or 80
    run(url.hostname, port, 4, args.warmup, args.inputs)
    print(f"| clients | requests/s | embeddings/s | p50 ms | p99 ms | other |")
    print(f"|--------:|-----------:|-------------:|-------:|-------:|-------|")
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        r = run(url.hostname, port, concurrency, args.seconds, args.inputs)
        print(
            f"| {r['concurrency']} | {r['requests_per_s']:.1f} | {r['embeddings_per_s']:.1f} "
            f"| {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['other'] or '-'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
