#!/usr/bin/env python3
"""Replay throughput of the CLI on one core: a synthetic audit log of 1,000,000
events (20,000 sessions of 10,000 users, 50 events each, the first a sign-in; a
user's two sessions share an address, and one session in fifty is replayed from
another country at the end), recorded without enrichment so that replay looks up
GeoIP (MaxMind's test databases) and parses user agents, scored under the default
rules. Target: 200,000 events per second.

    python3 bench/replay.py                           # the current release build
    python3 bench/replay.py --against /tmp/tw-before  # and another build, in turns

Build first (`cargo build --release --bin tokenwarden`). The CLI is pinned to core 1.
"""

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RELEASE, ROOT  # noqa: E402

ADDRESSES = ["81.2.69.142", "89.160.20.128", "216.160.83.56", "2.125.160.216", "175.16.199.10"]
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/132.0.6834.83 Safari/537.36",
]


def write_events(path, sessions=20_000, steps=50):
    start = 1_800_000_000_000
    with open(path, "w") as f:
        n = 0
        for step in range(steps):
            for s in range(sessions):
                ms = start + n * 13
                t = datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc)
                ts = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
                kind = "session_open" if step == 0 else "request"
                user = s // 2
                moved = step == steps - 1 and s % 50 == 0
                ip = ADDRESSES[(user + int(moved)) % len(ADDRESSES)]
                f.write(f'{{"ts":"{ts}","kind":"{kind}","session_id":"s-{s}","subject":"u-{user}",'
                        f'"ip":"{ip}","user_agent":"{AGENTS[s % 2]}","method":"GET","path":"/account",'
                        f'"decision":"allow"}}\n')
                n += 1
    return n


def replay(binary, events):
    geoip = ROOT / "tests" / "data" / "geoip"
    out = subprocess.run(
        ["taskset", "-c", "1", binary, "replay", "--rules", ROOT / "rules" / "default.toml",
         "--geoip-city", geoip / "GeoIP2-City-Test.mmdb", "--geoip-asn", geoip / "GeoLite2-ASN-Test.mmdb",
         events],
        capture_output=True, text=True, check=True,
    )
    m = re.search(r"(\d+) events in ([\d.]+) s", out.stderr)
    if not m:
        sys.exit(f"no timing in the replay's output:\n{out.stderr}")
    return int(m.group(1)) / float(m.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", type=Path, help="another tokenwarden binary, measured in turns")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    builds = {"this build": RELEASE / "tokenwarden"}
    if args.against:
        builds = {"against": args.against, **builds}
    with tempfile.TemporaryDirectory(prefix="tokenwarden-replay-") as work:
        events = Path(work) / "events.ndjson"
        n = write_events(events)
        print(f"{n:,} events written; replaying on core 1, {args.rounds} rounds")
        rates = {k: [] for k in builds}
        for r in range(args.rounds):
            for name, binary in builds.items():
                rate = replay(binary, events)
                rates[name].append(rate)
                print(f"round {r + 1} {name:<10} {rate:>10,.0f} events/s", flush=True)
    for name, values in rates.items():
        best, median = max(values), sorted(values)[len(values) // 2]
        print(f"{name:<10} best {best:,.0f} events/s, median {median:,.0f} (target 200,000: "
              f"{'met' if best >= 200_000 else 'missed'} at best)")
    if args.against:
        pairs = [b / a for a, b in zip(rates["against"], rates["this build"])]
        print("this build / against, per round: " + ", ".join(f"{p:.2f}×" for p in pairs))


if __name__ == "__main__":
    main()
