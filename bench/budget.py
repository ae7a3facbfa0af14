#!/usr/bin/env python3
"""How much work per request the saturation target leaves: the bare reference made to
spin a fixed time in each handler, measured at saturation beside the bare reference
and tokenwarden, in the harness's set-up and with its requests.

    python3 bench/budget.py                       # HS512 forward-auth, warm tokens
    python3 bench/budget.py --work 0,500,1000,2000,3000 --turns 3
    python3 bench/budget.py --rate 2000           # CPU per request at a paced rate

Beside them runs a common baseline, a naive axum + jsonwebtoken HS512 verifier
(`examples/bench/naive.rs`: every token's signature and expiry checked, nothing
cached, nothing recorded), on the same tokens, and tokenwarden's own `/healthz` on
the same requests (forward-auth's headers, another path): its framework, layers
and runtime without the decision. Each server's share of refused
requests is printed: the naive verifier refuses the mix's bad-signature and
expired tokens (10 %), tokenwarden the revoked ones too (15 %); a share far
from that means a server is not doing the work it is meant to.

Spinning is the cheapest work a request can do: it touches no memory, allocates
nothing and leaves the caches as they were. Each level's rate against the bare
reference's is the best ratio any server doing that much work per request can
reach here. The script prints the curve, the work at which it crosses the 0.8×
target, and where tokenwarden's own ratio falls on it; beside each, user and kernel
CPU per request from /proc, so tokenwarden's measured user-space work can be read
against the curve. With `--rate` every server is paced at that rate and the
ratio is of CPU per request, against the 1.3× target (tokenwarden measured over
a minute, as bench/run.py does: it holds one write of its sessions' sightings;
the others over 30 s by default, since /proc counts CPU in ticks of 10 ms,
0.8 µs per request over 6 s at 2000 req/s). Build first: `cargo build --release
--bin tokenwarden --example bench-reference --example bench-tokens --example
bench-naive`.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (CLK_TCK, RELEASE, Process, Tokenwarden, connections_for, free_port, stopping,  # noqa: E402
                 wait_http, wait_port, wrk)

TARGETS = {"saturation": 0.8, "paced": 1.3}


def measured(url, tokens, pid, seconds, rate, app_key="", mode="forward-auth"):
    """One run (at saturation when `rate` is 0): the rate, the share refused, and
    user, kernel and all CPU µs per request."""
    connections = connections_for(rate)
    r = wrk(url, tokens, mode, seconds, connections=connections, rate=rate, app_key=app_key,
            pids=[pid])
    if not r["requests"]:
        raise SystemExit(f"{url} answered no request")
    return {"rps": r["rps"], "refused": r["refused"] / r["requests"], "user_us": r["user_per_request_us"],
            "system_us": r["system_per_request_us"], "cpu_us": r["cpu_per_request_us"]}


def crossing(curve, ratio):
    """The work (ns) at which the curve passes `ratio`, by linear interpolation
    between the two levels around it; None outside the curve."""
    for (w0, r0), (w1, r1) in zip(curve, curve[1:]):
        if min(r0, r1) <= ratio <= max(r0, r1) and r0 != r1:
            return w0 + (w1 - w0) * (ratio - r0) / (r1 - r0)
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="0,500,1000,1500,2000,3000,4000",
                    help="nanoseconds each spinning reference spends per request (0 first: the bare one)")
    ap.add_argument("--turns", type=int, default=2, help="rounds over every server, each side averaged")
    ap.add_argument("--seconds", type=int, default=None, help="length of each run (6 s; paced, 30 s)")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--rate", type=int, default=0,
                    help="requests per second (0: saturation, the ratio of rates; else the ratio of CPU per request)")
    args = ap.parse_args()
    paced = args.rate > 0
    args.seconds = args.seconds or (30 if paced else 6)
    for binary in ("tokenwarden", "examples/bench-reference", "examples/bench-naive", "examples/bench-tokens"):
        if not (RELEASE / binary).is_file():
            raise SystemExit(f"no {RELEASE / binary}: build it first (see --help)")
    figure = "cpu_us" if paced else "rps"
    target = TARGETS["paced" if paced else "saturation"]
    tw_seconds = max(args.seconds, 60) if paced else args.seconds
    levels = sorted({int(w) for w in args.work.split(",")} | {0})
    with tempfile.TemporaryDirectory(prefix="tokenwarden-budget-") as work, stopping():
        servers = {}
        for ns in levels:
            port = free_port()
            servers[ns] = (Process([RELEASE / "examples" / "bench-reference", port, ns]),
                           f"http://127.0.0.1:{port}")
            wait_http(f"http://127.0.0.1:{port}/healthz")
        tw = Tokenwarden(work, "HS512")
        tokens, _ = tw.tokens(args.sessions, 0)
        naive_port = free_port()
        naive = Process([RELEASE / "examples" / "bench-naive", naive_port, tw.key])
        naive_url = f"http://127.0.0.1:{naive_port}"
        wait_port(naive_port)  # it answers 401 to a request without a token
        # Two passes over the file first, so every token has been seen (warm).
        wrk(tw.base, tokens, "forward-auth", 3, pids=[tw.proc.pid])
        runs = {ns: [] for ns in levels} | {"naive": [], "healthz": [], "tokenwarden": []}
        bare = []
        for turn in range(args.turns):
            # The bare reference before and after each turn; every ratio of the turn
            # is against their mean.
            first = measured(servers[0][1], tokens, servers[0][0].pid, args.seconds, args.rate)
            for ns in levels[1:]:
                runs[ns].append(measured(servers[ns][1], tokens, servers[ns][0].pid, args.seconds, args.rate))
            runs["naive"].append(measured(naive_url, tokens, naive.pid, args.seconds, args.rate))
            # Paced, over tokenwarden's minute too: it holds the sightings' write wherever it falls.
            runs["healthz"].append(measured(tw.base, tokens, tw.proc.pid, tw_seconds, args.rate,
                                            mode="healthz"))
            runs["tokenwarden"].append(measured(tw.base, tokens, tw.proc.pid, tw_seconds, args.rate, tw.app_key))
            last = measured(servers[0][1], tokens, servers[0][0].pid, args.seconds, args.rate)
            turn_bare = (first[figure] + last[figure]) / 2
            bare.append(turn_bare)
            runs[0] += [first, last]
            for key in runs:
                if key != 0:
                    runs[key][-1]["ratio"] = runs[key][-1][figure] / turn_bare
            print(f"turn {turn + 1}: the bare reference {first['rps']:,.0f} then {last['rps']:,.0f} req/s "
                  f"({first['cpu_us']:.1f} and {last['cpu_us']:.1f} µs/request), tokenwarden "
                  f"{runs['tokenwarden'][-1]['rps']:,.0f} req/s ({runs['tokenwarden'][-1]['cpu_us']:.1f} µs/request)",
                  flush=True)

    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)

    what = f"CPU per request at {args.rate} req/s" if paced else "Rate at saturation"
    print(f"\n## {what} against work per request (HS512 forward-auth requests, {args.seconds} s runs"
          + (f", tokenwarden {tw_seconds} s" if tw_seconds != args.seconds else "")
          + f", {args.turns} turn{'s' if args.turns != 1 else ''})\n")
    print(f"| server | rate | ratio to the bare reference ({'CPU per request' if paced else 'rate'}) "
          "| refused | user µs/request | kernel µs/request |")
    print("|---|---:|---:|---:|---:|---:|")

    def line(name, rows, ratio):
        print(f"| {name} | {mean(rows, 'rps'):,.0f} req/s | {ratio} | {mean(rows, 'refused'):.1%} "
              f"| {mean(rows, 'user_us'):.2f} | {mean(rows, 'system_us'):.2f} |")

    curve = [(0, 1.0)]
    line("bare reference", runs[0], "1")
    for ns in levels[1:]:
        ratio = mean(runs[ns], "ratio")
        curve.append((ns, ratio))
        line(f"reference spinning {ns / 1000:g} µs", runs[ns], f"{ratio:.2f}×")
    line("naive jsonwebtoken HS512 verifier", runs["naive"], f"{mean(runs['naive'], 'ratio'):.2f}×")
    line("tokenwarden's `/healthz` (its layers and runtime, no decision)", runs["healthz"],
         f"{mean(runs['healthz'], 'ratio'):.2f}×")
    tw_rows = runs["tokenwarden"]
    tw_ratio = mean(tw_rows, "ratio")
    line("tokenwarden", tw_rows, f"{tw_ratio:.2f}×")
    budget = crossing(curve, target)
    equivalent = crossing(curve, tw_ratio)
    spread = (max(bare) - min(bare)) / min(bare)
    print()
    unit = "µs/request" if paced else "req/s"
    places = 1 if paced else 0
    print(f"- the bare reference over the turns: {min(bare):,.{places}f}–{max(bare):,.{places}f} {unit} "
          f"(a spread of {spread:.0%})")
    print(f"- work per request at which a spinning reference reaches {target}×: "
          + (f"about {budget / 1000:.2f} µs" if budget is not None else "not within the levels measured"))
    print("- tokenwarden's ratio is that of a reference spinning "
          + (f"about {equivalent / 1000:.2f} µs per request" if equivalent is not None
             else "an amount not within the levels measured"))
    if paced:
        tick = 1e6 / CLK_TCK / (args.rate * args.seconds)
        print(f"- /proc counts CPU in ticks of {1000 / CLK_TCK:g} ms: {tick:.2f} µs per request over "
              f"{args.seconds} s at {args.rate} req/s, for user and kernel time each")
    extra_user = mean(tw_rows, "user_us") - mean(runs[0], "user_us")
    print(f"- tokenwarden's user CPU per request exceeds the bare reference's by {extra_user:.2f} µs")


if __name__ == "__main__":
    main()
