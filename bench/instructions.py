#!/usr/bin/env python3
"""Instructions per request of two builds, counted under callgrind: a figure that
does not move with a noisy machine, for judging a change too small for bench/ab.py
to see (a few per cent of a request's cost is inside one turn's noise there).

    cp target/release/tokenwarden /tmp/tokenwarden-before   # before the change
    cargo build --release --bin tokenwarden                 # after it
    python3 bench/instructions.py /tmp/tokenwarden-before   # HS512 forward-auth
    python3 bench/instructions.py /tmp/tokenwarden-before ES256 verify --top 30

Each build runs under `valgrind --tool=callgrind` with counting off while it starts,
its sessions are opened and it is warmed; counting is switched on
(`callgrind_control -i on`) for a run of wrk with 4 connections (so at most 4
requests straddle either edge of the count), then off. Every thread is counted:
the request path, the event writer and SQLite. It prints instructions per request
for A and B, their ratio, and the functions (inclusive of nothing: each one's own
instructions) whose count per request moved most.

Instructions are not time: a cache miss costs no instructions, so a change that
only saves misses shows here as nothing. Use it beside bench/ab.py, not instead.
Needs valgrind (Debian's `valgrind`).
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RELEASE, Tokenwarden, stopping, wrk  # noqa: E402


def wrapper(work, binary, name):
    """A script that runs `binary` under callgrind, counting nothing until told."""
    script = Path(work) / f"callgrind-{name}.sh"
    out = Path(work) / f"callgrind-{name}.out"
    script.write_text(
        "#!/bin/sh\n"
        f'exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file={out} '
        f'--dump-instr=no --dump-line=no "{binary}" "$@"\n'
    )
    script.chmod(0o755)
    return script, out


def own_counts(out):
    """Each function's own instructions (`callgrind_annotate`), and the total."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", str(out)],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*([\d,]+).*PROGRAM TOTALS", text, re.M)
    if not m:
        sys.exit(f"no totals in callgrind_annotate output:\n{text[:3000]}")
    total = int(m.group(1).replace(",", ""))
    functions = {}
    for count, name in re.findall(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$", text, re.M):
        if "PROGRAM TOTALS" in name or name.startswith("=>"):
            continue
        name = re.sub(r"^\S*:", "", name.split(" [")[0])
        functions[name] = functions.get(name, 0) + int(count.replace(",", ""))
    return total, functions


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path, help="the tokenwarden binary to compare against (A)")
    ap.add_argument("alg", nargs="?", default="HS512", choices=["HS512", "ES256", "EdDSA"])
    ap.add_argument("mode", nargs="?", default="forward-auth", choices=["forward-auth", "verify"])
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--seconds", type=int, default=20, help="length of the counted run (default 20)")
    ap.add_argument("--top", type=int, default=15, help="functions to list (default 15)")
    ap.add_argument("--keep", type=Path, help="copy the callgrind files here (callgrind-A.out, -B.out)")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install valgrind")
    if not args.before.is_file():
        sys.exit(f"no binary at {args.before}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tokenwarden-instructions-") as work, stopping():
        for name, binary in (("A", args.before.resolve()), ("B", RELEASE / "tokenwarden")):
            script, out = wrapper(work, binary, name)
            tw = Tokenwarden(work, args.alg, binary=script, name=f"-{name.lower()}")
            tokens, _ = tw.tokens(args.sessions, 0)
            wrk(tw.base, tokens, args.mode, 5, connections=4, app_key=tw.app_key)  # warm
            subprocess.run(["callgrind_control", "-i", "on", str(tw.proc.pid)], check=True,
                           capture_output=True)
            r = wrk(tw.base, tokens, args.mode, args.seconds, connections=4, app_key=tw.app_key)
            subprocess.run(["callgrind_control", "-i", "off", str(tw.proc.pid)], check=True,
                           capture_output=True)
            tw.proc.stop()
            for _ in range(100):
                if out.exists() and out.stat().st_size:
                    break
                time.sleep(0.1)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(out, args.keep / out.name)
            total, functions = own_counts(out)
            results[name] = (r["requests"], total, functions)
            print(f"{name}  {r['requests']:,} requests counted ({r['refused']:,} refused by design), "
                  f"{total / r['requests']:,.0f} instructions per request", flush=True)
    (na, ta, fa), (nb, tb, fb) = results["A"], results["B"]
    print(f"B/A  instructions per request {tb / nb / (ta / na):.4f}×")
    moved = sorted(set(fa) | set(fb), key=lambda f: -abs(fb.get(f, 0) / nb - fa.get(f, 0) / na))
    print(f"\n{'A':>9} {'B':>9} {'B-A':>8}  own instructions per request, most moved first")
    for f in moved[:args.top]:
        a, b = fa.get(f, 0) / na, fb.get(f, 0) / nb
        print(f"{a:9.1f} {b:9.1f} {b - a:+8.1f}  {f[:110]}")


if __name__ == "__main__":
    main()
