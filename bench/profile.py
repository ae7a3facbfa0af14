#!/usr/bin/env python3
"""One measurement of bench/run.py, for working on the hot path: tokenwarden and the
reference side by side in a single mode, optionally under `perf record`.

    python3 bench/profile.py                          # HS512 forward-auth, saturation
    python3 bench/profile.py ES256 verify 2000        # /v1/verify paced at 2000 req/s
    python3 bench/profile.py HS512 forward-auth 0 --perf   # writes perf.data here

It runs the reference, then tokenwarden, then the reference again (6 s each), and
prints the rate, CPU per request and p50 of each with the ratios. Build first
(`cargo build --release --bin tokenwarden --example bench-reference --example
bench-tokens`) or let bench/run.py do it.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RELEASE, Process, Tokenwarden, connections_for, free_port, stopping, wait_http, wrk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("alg", nargs="?", default="HS512", choices=["HS512", "ES256", "EdDSA"])
    ap.add_argument("mode", nargs="?", default="forward-auth", choices=["forward-auth", "verify"])
    ap.add_argument("rate", nargs="?", type=int, default=0, help="requests per second (0: saturation)")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--perf", action="store_true", help="record tokenwarden with perf into ./perf.data")
    ap.add_argument("--dwarf", action="store_true",
                    help="with --perf: unwind with DWARF (callers in Rust code and libc; 3 s, larger file)")
    args = ap.parse_args()
    connections = connections_for(args.rate)
    with tempfile.TemporaryDirectory(prefix="tokenwarden-profile-") as work, stopping():
        port = free_port()
        reference = Process([RELEASE / "examples" / "bench-reference", port])
        ref_url = f"http://127.0.0.1:{port}"
        wait_http(f"{ref_url}/healthz")
        tw = Tokenwarden(work, args.alg)
        tokens, _ = tw.tokens(args.sessions, 0)
        wrk(tw.base, tokens, args.mode, 3, app_key=tw.app_key, pids=[tw.proc.pid])  # warm
        run = lambda url, pid, key="": wrk(url, tokens, args.mode, 6, connections=connections,  # noqa: E731
                                           rate=args.rate, app_key=key, pids=[pid])
        first = run(ref_url, reference.pid)
        perf = None
        if args.perf:
            unwind = ["--call-graph", "dwarf,16384"] if args.dwarf else ["-g"]
            limit = ["--", "sleep", "3"] if args.dwarf else []
            perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", *unwind, "-p", str(tw.proc.pid),
                                     "-o", "perf.data", *limit],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        measured = run(tw.base, tw.proc.pid, tw.app_key)
        if perf:
            perf.send_signal(2)
            perf.wait()
        last = run(ref_url, reference.pid)
        dropped = tw.metric("tokenwarden_events_dropped_total")
        tw.proc.stop()
        reference.stop()
    ref = {k: (first[k] + last[k]) / 2 for k in ("rps", "cpu_per_request_us", "p50")}
    print(f"reference    {first['rps']:>9,.0f} then {last['rps']:,.0f} req/s  "
          f"{ref['cpu_per_request_us']:6.1f} µs/req  p50 {ref['p50']:.3f} ms")
    print(f"tokenwarden  {measured['rps']:>9,.0f} req/s  {measured['cpu_per_request_us']:6.1f} µs/req  "
          f"p50 {measured['p50']:.3f} ms  ({measured['server_cpu_share']:.0%} of a core, "
          f"{dropped or 0:.0f} events dropped)")
    print(f"ratios       rate {measured['rps'] / ref['rps']:.2f}×  "
          f"CPU per request {measured['cpu_per_request_us'] / ref['cpu_per_request_us']:.2f}×  "
          f"p50 {measured['p50'] / ref['p50']:.2f}×")


if __name__ == "__main__":
    main()
