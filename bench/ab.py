#!/usr/bin/env python3
"""Two builds of tokenwarden side by side, for judging a change to the hot path on a
noisy machine: a saved binary (A, e.g. the previous commit's) and the current
release build (B), measured in turns (A, B, A, B, ...), each 6 s, with the same
kind of load. Prints every turn and the ratio B/A of the means.

    cp target/release/tokenwarden /tmp/tokenwarden-before   # before the change
    cargo build --release --bin tokenwarden                 # after it
    python3 bench/ab.py /tmp/tokenwarden-before             # HS512 forward-auth, saturation
    python3 bench/ab.py /tmp/tokenwarden-before HS512 forward-auth 2000 --rounds 4
    python3 bench/ab.py /tmp/tokenwarden-before --never-seen --rounds 6   # each token once
    python3 bench/ab.py /tmp/tokenwarden-before HS512 forward-auth 2000 --seconds 60

Turns are 6 s unless `--seconds` says otherwise. At a paced rate, 60 s turns each
hold one of the minute's writes of unchanged sightings, which a 6 s turn holds or
not by chance (up to 13 µs per request at 2000 req/s): CPU per request at a fixed
rate is judged with 60 s turns, as bench/run.py measures it.

Both servers run on the server core with their own SQLite file, keys and 10,000
sessions; only the one under load is busy.
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RELEASE, Tokenwarden, connections_for, stopping, wrk  # noqa: E402


# Never-seen tokens each turn gets to itself: more than 6 s at 50,000 req/s.
NEVER_SEEN_PER_TURN = 300_000


def turn_files(cold, rounds):
    """Splits the never-seen tokens into one file a turn, so no turn repeats a token."""
    lines = cold.read_text().splitlines(keepends=True)
    files = []
    for n in range(rounds):
        part = cold.with_name(f"{cold.name}.{n}")
        part.write_text("".join(lines[n * NEVER_SEEN_PER_TURN:(n + 1) * NEVER_SEEN_PER_TURN]))
        files.append(part)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the tokenwarden binary to compare against (A)")
    ap.add_argument("alg", nargs="?", default="HS512", choices=["HS512", "ES256", "EdDSA"])
    ap.add_argument("mode", nargs="?", default="forward-auth", choices=["forward-auth", "verify"])
    ap.add_argument("rate", nargs="?", type=int, default=0, help="requests per second (0: saturation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=6, help="length of each turn (default 6)")
    ap.add_argument("--sessions", type=int, default=10000)
    ap.add_argument("--never-seen", action="store_true",
                    help=f"every request a token not seen before ({NEVER_SEEN_PER_TURN:,} a turn)")
    args = ap.parse_args()
    if not args.before.is_file():
        sys.exit(f"no binary at {args.before}")
    args.before = args.before.resolve()  # the servers start in their own directories
    connections = connections_for(args.rate)
    with tempfile.TemporaryDirectory(prefix="tokenwarden-ab-") as work, stopping():
        servers = {
            "A": Tokenwarden(work, args.alg, binary=args.before, name="-a"),
            "B": Tokenwarden(work, args.alg, binary=RELEASE / "tokenwarden", name="-b"),
        }
        cold = NEVER_SEEN_PER_TURN * args.rounds if args.never_seen else 0
        files = {k: tw.tokens(args.sessions, cold) for k, tw in servers.items()}
        tokens = {k: warm for k, (warm, _) in files.items()}
        turns = {k: turn_files(f, args.rounds) if args.never_seen else [tokens[k]] * args.rounds
                 for k, (_, f) in files.items()}
        for k, tw in servers.items():
            wrk(tw.base, tokens[k], args.mode, 3, app_key=tw.app_key, pids=[tw.proc.pid])  # warm
        runs = {"A": [], "B": []}
        for n in range(args.rounds):
            for k, tw in servers.items():
                r = wrk(tw.base, turns[k][n], args.mode, args.seconds, connections=connections, rate=args.rate,
                        app_key=tw.app_key, pids=[tw.proc.pid])
                runs[k].append(r)
                if args.never_seen and r["requests"] > NEVER_SEEN_PER_TURN:
                    print(f"WARNING: turn {n + 1} {k} sent {r['requests']:,} requests, more than its "
                          f"{NEVER_SEEN_PER_TURN:,} never-seen tokens", flush=True)
                print(f"round {n + 1} {k}  {r['rps']:>9,.0f} req/s  {r['cpu_per_request_us']:6.1f} µs/req  "
                      f"p50 {r['p50']:.3f} ms  p90 {r['p90']:.3f} ms  p99 {r['p99']:.3f} ms", flush=True)
        for tw in servers.values():
            tw.proc.stop()
    measures = ("rps", "cpu_per_request_us", "p50", "p90", "p99")
    mean = {k: {m: statistics.mean(r[m] for r in v) for m in measures} for k, v in runs.items()}
    for k in ("A", "B"):
        print(f"{k} mean      {mean[k]['rps']:>9,.0f} req/s  {mean[k]['cpu_per_request_us']:6.1f} µs/req  "
              f"p50 {mean[k]['p50']:.3f} ms  p90 {mean[k]['p90']:.3f} ms  p99 {mean[k]['p99']:.3f} ms")
    ratio = {m: mean["B"][m] / mean["A"][m] for m in measures}
    print(f"B/A         rate {ratio['rps']:.3f}×  CPU per request {ratio['cpu_per_request_us']:.3f}×  "
          f"p50 {ratio['p50']:.3f}×  p90 {ratio['p90']:.3f}×  p99 {ratio['p99']:.3f}×")


if __name__ == "__main__":
    main()
