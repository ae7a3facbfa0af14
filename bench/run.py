#!/usr/bin/env python3
"""tokenwarden side by side with a bare axum server: one command, loopback only.

    python3 bench/run.py            # the whole run (about 9 minutes)
    python3 bench/run.py --quick    # shorter runs, fewer tokens (a smoke test)
    python3 bench/run.py --pgo      # both servers profile-guided (after bench/pgo.py)

Servers are pinned to core 0, the load generator (wrk, Debian) to core 1. Every
figure is printed as a ratio to the reference measured in the same run: the
machines are noisy, absolute numbers drift, ratios hold. Each tokenwarden figure is
divided by the reference's figure in the same mode measured just before it (the
machine's speed moves within minutes; warm saturation and nginx in two alternating
turns, averaged); the reference also runs first and last, a
drift over 15 % between them is flagged, and the spread of all its saturation runs
is printed. Nothing here is a pass/fail test.
"""

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
# The servers' builds (tokenwarden and the reference): the plain release build, or
# with --pgo the profile-guided one bench/pgo.py makes. The load generator's
# helper (bench-tokens) is always the plain build.
PGO_RELEASE = ROOT / "target" / "pgo" / "release"
PGO_STAMP = ROOT / "target" / "pgo" / "SOURCE"  # what bench/pgo.py built from
SERVERS = RELEASE
# What the servers are built from: a profile-guided build stays current while
# none of these changes.
BUILD_INPUTS = ("src", "examples", "rules", "migrations", "vendor", "Cargo.toml", "Cargo.lock", "build.rs")
SERVER_CORE, LOAD_CORE = "0", "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port} after {timeout} s")


def user_system(pid):
    """User and system CPU seconds of a process and all its threads, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def user_system_of(pids):
    """User and system CPU seconds of several processes, summed."""
    times = [user_system(p) for p in pids]
    return sum(u for u, _ in times), sum(s for _, s in times)


# Every Process started and not yet stopped, for `stopping()`.
RUNNING = []


class Process:
    def __init__(self, args, core=SERVER_CORE, env=None, cwd=None):
        self.proc = subprocess.Popen(
            ["taskset", "-c", core, *map(str, args)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        RUNNING.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        """Terminates the process and waits for it; a second call does nothing."""
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def stopping():
    """Stops every Process still running when the block ends, however it ends: a run
    that fails midway leaves no server behind on the pinned core."""
    try:
        yield
    finally:
        for process in reversed(RUNNING[:]):
            process.stop()


def parse_duration_ms(text):
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def connections_for(rate):
    """The connections wrk keeps open for a run at `rate` (0: saturation): 16 when
    paced at 2000 req/s or less, else 64. Every script measures with the same."""
    return 16 if 0 < rate <= 2000 else 64


def wrk(url, tokens, mode, seconds, connections=64, rate=0, app_key="", pids=()):
    """One wrk run on the load core; returns rate, latencies and server CPU."""
    env = {
        "TW_TOKENS": str(tokens),
        "TW_MODE": mode,
        "TW_APP_KEY": app_key,
        "TW_RATE": str(rate),
        "TW_CONNECTIONS": str(connections),
    }
    user_before, system_before = user_system_of(pids)
    started = time.monotonic()
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
         "--latency", "-s", str(ROOT / "bench" / "requests.lua"), url],
        capture_output=True, text=True, env={**os.environ, **env}, check=True,
    ).stdout
    wall = time.monotonic() - started
    user_after, system_after = user_system_of(pids)
    user, system = user_after - user_before, system_after - system_before
    cpu = user + system
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    latency = {p: parse_duration_ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": requests,
        "p50": latency.get("50"),
        "p90": latency.get("90"),
        "p99": latency.get("99"),
        "refused": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
        "cpu_per_request_us": cpu / requests * 1e6 if requests else None,
        "user_per_request_us": user / requests * 1e6 if requests else None,
        "system_per_request_us": system / requests * 1e6 if requests else None,
        "server_cpu_share": cpu / wall,
    }


def combined(runs):
    """Several wrk runs of one server in one mode as one: rates, latencies and CPU
    averaged, requests counted."""
    out = dict(runs[0])
    for key in ("rps", "p50", "p90", "p99", "cpu_per_request_us", "server_cpu_share"):
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    for key in ("requests", "refused"):
        out[key] = sum(r[key] for r in runs)
    out["socket_errors"] = "; ".join(r["socket_errors"] for r in runs if r["socket_errors"])
    return out


def git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def build_inputs_stamp():
    """The commit the servers' sources are at, and whether they hold uncommitted changes."""
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "an unknown source (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", *BUILD_INPUTS).stdout.strip()
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def build(pgo=False):
    if pgo:
        log("building (release): the bench-tokens helper; the servers are bench/pgo.py's builds")
        subprocess.run(["cargo", "build", "--release", "--example", "bench-tokens"], cwd=ROOT, check=True)
        return
    log("building (release): tokenwarden and the bench examples")
    subprocess.run(
        ["cargo", "build", "--release", "--bin", "tokenwarden", "--example", "bench-reference",
         "--example", "bench-tokens"],
        cwd=ROOT, check=True,
    )


class Tokenwarden:
    """tokenwarden on SQLite with one signing key of `alg`, the default rules and
    MaxMind's test GeoIP databases; forwarding headers believed from loopback."""

    def __init__(self, work, alg, binary=None, name=""):
        binary = binary or SERVERS / "tokenwarden"
        self.dir = Path(work) / f"tokenwarden-{alg}{name}"
        self.dir.mkdir()
        self.port, self.admin_port = free_port(), free_port()
        self.app_key = secrets.token_hex(32)
        self.key = self.dir / "bench.key"
        subprocess.run([binary, "keys", "generate", "--alg", alg, "--out", self.key],
                       check=True, capture_output=True)
        geoip = ROOT / "tests" / "data" / "geoip"
        config = self.dir / "tokenwarden.toml"
        config.write_text(f"""
database_url = "sqlite://{self.dir}/tw.db"
listen = "127.0.0.1:{self.port}"
admin_listen = "127.0.0.1:{self.admin_port}"
data_dir = "{self.dir}"
rules = "{ROOT}/rules/default.toml"
geoip_city = "{geoip}/GeoIP2-City-Test.mmdb"
geoip_asn = "{geoip}/GeoLite2-ASN-Test.mmdb"
trusted_proxies = ["127.0.0.1/32"]
metrics_open = true
log = "warn"
[[apps]]
id = "bench"
key_sha256 = "{hashlib.sha256(self.app_key.encode()).hexdigest()}"
[tokens]
access_ttl = "1h"
[[keys]]
kid = "bench"
alg = "{alg}"
path = "{self.key}"
""")
        self.alg = alg
        self.proc = Process([binary, "--config", config, "serve"], cwd=self.dir)
        self.base = f"http://127.0.0.1:{self.port}"
        wait_http(f"{self.base}/healthz")

    def tokens(self, sessions, cold):
        out = self.dir / "requests.tsv"
        log(f"  {self.alg}: opening {sessions} sessions, writing {cold} never-seen tokens")
        subprocess.run(
            ["taskset", "-c", LOAD_CORE, RELEASE / "examples" / "bench-tokens", self.base, self.app_key,
             self.key, self.alg, str(sessions), str(cold), out],
            check=True, capture_output=True,
        )
        return out, Path(f"{out}.cold")

    def metric(self, name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics").read().decode()
        values = [float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        return sum(values) if values else None


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    upstream authorizer {{ server {auth}; keepalive 64; }}
    upstream app {{ server {app}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location = /_auth {{
            internal;
            proxy_pass http://authorizer/v1/forward-auth;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_set_header X-Original-URI $request_uri;
            proxy_set_header X-Original-Method $request_method;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
        location / {{
            auth_request /_auth;
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def nginx(work, name, auth, app):
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    d = Path(work) / f"nginx-{name}"
    d.mkdir()
    port = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(dir=d, auth=auth, app=app, port=port))
    proc = Process([binary, "-e", "stderr", "-p", d, "-c", d / "nginx.conf", "-g", "daemon off;"])
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def pids_of(proc):
    """The process and its children (nginx's worker)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    nested = []
    for k in kids:
        c = Path(f"/proc/{k}/task/{k}/children")
        if c.exists():
            nested += [int(p) for p in c.read_text().split()]
    return [proc.pid, *kids, *nested]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs and fewer tokens")
    ap.add_argument("--seconds", type=int, default=None, help="length of each run")
    ap.add_argument("--sessions", type=int, default=None, help="distinct sessions and tokens")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--pgo", action="store_true",
                    help="run bench/pgo.py's profile-guided builds of both servers (target/pgo/release)")
    args = ap.parse_args()
    global SERVERS
    build_note = "release builds"
    if args.pgo:
        SERVERS = PGO_RELEASE
        for binary in (SERVERS / "tokenwarden", SERVERS / "examples" / "bench-reference"):
            if not binary.is_file():
                raise SystemExit(f"no profile-guided build at {binary}: run python3 bench/pgo.py first")
        source = PGO_STAMP.read_text().strip() if PGO_STAMP.is_file() else "an unknown source"
        build_note = f"profile-guided builds of {source}"
        built_from = source.split()[0]
        now = build_inputs_stamp()
        stale = source != now and git("diff", "--quiet", built_from, "--", *BUILD_INPUTS).returncode != 0
        if "uncommitted" in source:
            log(f"WARNING: the profile-guided builds are of {source}: whether they are current cannot be told")
        elif stale:
            log(f"WARNING: the profile-guided builds are of {source}; the sources now are {now}: "
                "run bench/pgo.py again")
            build_note += f"; the sources have changed since (now {now})"
    seconds = args.seconds or (2 if args.quick else 6)
    cpu_seconds_tw = seconds if args.quick else max(seconds, 60)
    saturation_turns = 1 if args.quick else 2
    sessions = args.sessions or (2000 if args.quick else 10000)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install {'wrk' if tool == 'wrk' else 'util-linux'}")
    if os.cpu_count() < 2:
        raise SystemExit("two cores are needed: one for the servers, one for the load")
    if not args.no_build:
        build(args.pgo)

    rows = []  # (what, measured, reference, ratio, target, met)

    def row(what, value, reference, target=None, lower_is_better=False, unit=""):
        ratio = value / reference if value and reference else None
        met = None
        if target is not None and ratio is not None:
            met = ratio <= target if lower_is_better else ratio >= target
        rows.append((what, value, reference, ratio, target, lower_is_better, met, unit))

    with tempfile.TemporaryDirectory(prefix="tokenwarden-bench-") as work, stopping():
        ref_port = free_port()
        reference = Process([SERVERS / "examples" / "bench-reference", ref_port])
        ref_url = f"http://127.0.0.1:{ref_port}"
        wait_http(f"{ref_url}/healthz")

        # The reference ignores tokens; any request file gives it the same request shape.
        first = Tokenwarden(work, "HS512")
        # Enough never-seen tokens for 120,000 req/s: when the machine was fast, tokenwarden reached
        # 63,700 req/s (past what 60,000 allowed) and then 85,600 (past 80,000), and
        # presented some tokens twice.
        warm, cold = first.tokens(sessions, 0 if args.quick else 120_000 * seconds)
        ref = {}
        log("reference (first)")
        ref["fa_first"] = wrk(ref_url, warm, "forward-auth", seconds, pids=[reference.pid])
        # Every reference saturation run, for the spread printed at the end.
        ref_saturation = [ref["fa_first"]["rps"]]

        def paired(tw_url, tokens, mode, pid, tw_seconds=seconds, turns=1, **kw):
            """The reference, then tokenwarden, in the same mode, one after the other;
            `turns` times in alternation, each side averaged over its turns."""
            kw_ref = {k: v for k, v in kw.items() if k != "app_key"}
            before, measured = [], []
            for _ in range(turns):
                before.append(wrk(ref_url, warm, mode, seconds, pids=[reference.pid], **kw_ref))
                if not kw.get("rate"):
                    ref_saturation.append(before[-1]["rps"])
                measured.append(wrk(tw_url, tokens, mode, tw_seconds, pids=pid, **kw))
            result = combined(measured)
            result["reference"] = combined(before)
            return result

        results = {}
        for alg in ("HS512", "ES256", "EdDSA"):
            tw = first if alg == "HS512" else Tokenwarden(work, alg)
            w, c = (warm, cold) if alg == "HS512" else tw.tokens(sessions, 0)
            pid = [tw.proc.pid]
            log(f"tokenwarden {alg}, each mode after the reference in the same mode")
            # Two passes over the file first, so every token has been seen (warm).
            wrk(tw.base, w, "forward-auth", max(2, seconds // 2), pids=pid)
            r = {
                # Warm saturation in two alternating turns: the figures the machine's
                # moods sway most. (Never-seen tokens get one: a second turn would
                # present the first turn's tokens again.)
                "fa": paired(tw.base, w, "forward-auth", pid, turns=saturation_turns),
                "verify": paired(tw.base, w, "verify", pid, app_key=tw.app_key, turns=saturation_turns),
                # One whole minute: tokenwarden writes the sightings of its unchanged
                # sessions once a minute (10,000 sessions: about 150 ms of CPU), and a
                # 6 s window would hold that sweep or not by chance.
                "cpu2000": paired(tw.base, w, "forward-auth", pid, tw_seconds=cpu_seconds_tw,
                                  connections=connections_for(2000), rate=2000),
                "lat10000": paired(tw.base, w, "forward-auth", pid, connections=connections_for(10000), rate=10000),
            }
            if alg == "HS512" and not args.quick:
                r["cold"] = paired(tw.base, c, "forward-auth", pid)
                r["cold_tokens"] = sum(1 for _ in open(c))
            r["dropped"] = tw.metric("tokenwarden_events_dropped_total")
            r["decisions"] = tw.metric("tokenwarden_requests_total")
            results[alg] = r
            if alg == "HS512":
                log("nginx in front: tokenwarden forward-auth vs the reference as the authorizer")
                app_port = free_port()
                upstream = Process([SERVERS / "examples" / "bench-reference", app_port])
                wait_http(f"http://127.0.0.1:{app_port}/")
                ng_ref, ng_ref_url = nginx(work, "reference", f"127.0.0.1:{ref_port}", f"127.0.0.1:{app_port}")
                ng_tw, ng_tw_url = nginx(work, "tokenwarden", f"127.0.0.1:{tw.port}", f"127.0.0.1:{app_port}")
                # In alternating turns too, each side averaged.
                ng_runs = {"ref": [], "tw": []}
                for _ in range(saturation_turns):
                    ng_runs["ref"].append(wrk(ng_ref_url, w, "gateway", seconds,
                                              pids=[*pids_of(ng_ref.proc), reference.pid, upstream.pid]))
                    ng_runs["tw"].append(wrk(ng_tw_url, w, "gateway", seconds,
                                             pids=[*pids_of(ng_tw.proc), tw.proc.pid, upstream.pid]))
                r["nginx_ref"], r["nginx_tw"] = combined(ng_runs["ref"]), combined(ng_runs["tw"])
                for p in (ng_ref, ng_tw, upstream):
                    p.stop()
            if tw is not first:
                tw.proc.stop()
        first.proc.stop()
        log("reference (last)")
        ref["fa_last"] = wrk(ref_url, warm, "forward-auth", seconds, pids=[reference.pid])
        ref_saturation.append(ref["fa_last"]["rps"])
        reference.stop()

    # The report: each figure against the reference run just before it.
    ref_fa = ref["fa_first"]["rps"]
    for alg, r in results.items():
        row(f"{alg} forward-auth, warm tokens: saturation", r["fa"]["rps"], r["fa"]["reference"]["rps"], 0.8,
            unit="req/s")
        row(f"{alg} /v1/verify, warm tokens: saturation", r["verify"]["rps"], r["verify"]["reference"]["rps"], 0.8,
            unit="req/s")
        if "cold" in r:
            row(f"{alg} forward-auth, never-seen tokens: saturation", r["cold"]["rps"],
                r["cold"]["reference"]["rps"], 0.5, unit="req/s")
        row(f"{alg} CPU per request at 2000 req/s", r["cpu2000"]["cpu_per_request_us"],
            r["cpu2000"]["reference"]["cpu_per_request_us"], 1.3, lower_is_better=True, unit="µs")
        for p in ("p50", "p90", "p99"):
            row(f"{alg} {p} at 10000 req/s", r["lat10000"][p], r["lat10000"]["reference"][p],
                1.3 if p == "p50" else None, lower_is_better=True, unit="ms")
        if "nginx_tw" in r:
            row("nginx → tokenwarden forward-auth vs nginx → bare axum authorizer: saturation",
                r["nginx_tw"]["rps"], r["nginx_ref"]["rps"], 0.9, unit="req/s")

    print(f"\n## tokenwarden vs a bare axum server ({sessions} sessions, {seconds} s runs, "
          f"server on core {SERVER_CORE}, wrk on core {LOAD_CORE}; {build_note})\n")
    print("| measure | tokenwarden | reference | ratio | target | |")
    print("|---|---:|---:|---:|---:|---|")
    for what, value, reference_value, ratio, target, lower, met, unit in rows:
        fmt = (lambda v: f"{v:,.0f} {unit}") if unit == "req/s" else (lambda v: f"{v:.3g} {unit}")
        t = "" if target is None else (f"≤ {target}×" if lower else f"≥ {target}×")
        verdict = "" if met is None else ("met" if met else "**missed**")
        print(f"| {what} | {fmt(value) if value else '-'} | {fmt(reference_value) if reference_value else '-'} "
              f"| {ratio:.2f}× | {t} | {verdict} |" if ratio else f"| {what} | - | - | - | {t} | |")

    print("\nDetails:\n")
    for alg, r in results.items():
        fa = r["fa"]
        print(f"- {alg}: forward-auth {fa['requests']:,} requests ({fa['refused']:,} refused by design: "
              f"bad, expired, revoked tokens), server CPU {fa['server_cpu_share']:.0%} of a core; "
              f"decisions {r['decisions'] or 0:,.0f}, audit events dropped {r['dropped'] or 0:,.0f}"
              + (f"; never-seen run used {r['cold']['requests']:,} of {r['cold_tokens']:,} tokens"
                 if "cold" in r else ""))
    paced = [r["cpu2000"]["reference"]["rps"] for r in results.values()]
    print(f"- reference: {ref['fa_first']['rps']:,.0f} req/s first, {ref['fa_last']['rps']:,.0f} last; "
          f"server CPU {ref['fa_first']['server_cpu_share']:.0%} of a core at saturation; "
          f"at 2000 req/s {min(paced):,.0f}–{max(paced):,.0f} req/s achieved")
    print(f"- CPU per request at 2000 req/s: tokenwarden over {cpu_seconds_tw} s (a minute holds one write of "
          f"its unchanged sessions' sightings), the reference over {seconds} s")
    low, high = min(ref_saturation), max(ref_saturation)
    print(f"- reference saturation over the run's {len(ref_saturation)} runs of it (both endpoints): "
          f"{low:,.0f}–{high:,.0f} req/s, a spread of {(high - low) / low:.0%}; each ratio above is "
          "against the reference run just before it")
    for alg, r in results.items():
        if "cold" in r and r["cold"]["requests"] > r["cold_tokens"]:
            print(f"\n**WARNING: the never-seen {alg} run needed {r['cold']['requests']:,} tokens and had "
                  f"{r['cold_tokens']:,}: some were seen twice, so its figure flatters tokenwarden.**")
    drift = abs(ref["fa_last"]["rps"] - ref_fa) / ref_fa
    if drift > 0.15:
        print(f"\n**WARNING: the reference drifted {drift:.0%} between the first and the last run: "
              "the machine was busy; run again before trusting these ratios.**")
    else:
        print(f"- reference drift between first and last run: {drift:.1%} (under 15 %)")
    if ref["fa_first"]["server_cpu_share"] < 0.9:
        print("- note: the reference did not use its whole core at saturation: the load generator "
              "is the limit there, so saturation ratios are flattered towards 1.")


if __name__ == "__main__":
    main()
