#!/usr/bin/env python3
"""One client beside the load: times sequential requests to one endpoint.

Run it while `wrk` saturates the server. It sends one request at a time on a
fresh connection (as a kubelet probe does), spaced by --interval, and prints
the p50 / p99 / max latency in milliseconds of each status. It is
bounded in count and time and talks to loopback only.

    python3 scripts/probe_latency.py --port 8081 --path /readyz --count 300
    python3 scripts/probe_latency.py --port 8080 --path /embed --post '{"inputs": "hi"}'
"""

import argparse
import http.client
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--path", default="/readyz")
    parser.add_argument("--post", help="JSON body: POST instead of GET")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between requests")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit("loopback only")

    statuses = {}
    deadline = time.monotonic() + args.count * (args.interval + args.timeout)
    for _ in range(args.count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            conn = http.client.HTTPConnection(args.host, args.port, timeout=args.timeout)
            if args.post is None:
                conn.request("GET", args.path)
            else:
                conn.request("POST", args.path, args.post, {"Content-Type": "application/json"})
            status = conn.getresponse().status
            conn.close()
        except OSError as err:
            status = type(err).__name__
        statuses.setdefault(status, []).append((time.perf_counter() - start) * 1e3)
        time.sleep(args.interval)

    # Latency per status: a 429 and a 200 are different questions.
    for status, latencies in sorted(statuses.items(), key=lambda kv: str(kv[0])):
        latencies.sort()
        pick = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
        print(
            f"{args.path} {status}: n={len(latencies)} "
            f"p50={pick(50):.1f}ms p99={pick(99):.1f}ms max={latencies[-1]:.1f}ms"
        )


if __name__ == "__main__":
    main()
