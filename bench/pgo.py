#!/usr/bin/env python3
"""Profile-guided builds of tokenwarden and the bench reference, for
`python3 bench/run.py --pgo`: both sides built the same way, so the ratios stay fair.

    python3 bench/pgo.py            # about 17 minutes on two cores

1. an instrumented build of both servers (`-Cprofile-generate`) into
   target/pgo-generate;
2. training with the benchmark's own load: for each of HS512, ES256 and EdDSA,
   10,000 sessions, forward-auth and /v1/verify at saturation and forward-auth at
   2000 req/s; never-seen HS512 tokens; the reference under the same load;
3. the profiles merged with the `llvm-profdata` of rustc's own LLVM major
   (Debian's `llvm-N` package, N from `rustc -vV`);
4. the optimised build (`-Cprofile-use`) into target/pgo/release, stamped with the
   commit its sources were at (target/pgo/SOURCE: src, examples, rules, migrations,
   vendor, Cargo files), which bench/run.py --pgo prints, warning when they changed.

Each step fails loudly: a missing tool, a training run that wrote no profile, a
merge that failed. In target/release it builds only the plain bench-tokens helper;
the plain servers there are left as they are. RUSTFLAGS from the environment are
kept, with the profile flags added.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (PGO_STAMP, ROOT, SERVER_CORE, Process, Tokenwarden, build, build_inputs_stamp, free_port,  # noqa: E402
                 log, stopping, wait_http, wrk)

GENERATE = ROOT / "target" / "pgo-generate"
PGO = ROOT / "target" / "pgo"
SECONDS = 5
SESSIONS = 10_000
NEVER_SEEN = 100_000


def llvm_profdata():
    """The llvm-profdata whose LLVM major is rustc's: a profile written by one
    major is not always readable by another."""
    out = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"^LLVM version: (\d+)", out, re.M)
    if not found:
        raise SystemExit(f"rustc -vV names no LLVM version:\n{out}")
    major = found.group(1)
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True).stdout.strip()
    candidates = [shutil.which(f"llvm-profdata-{major}"), f"/usr/lib/llvm-{major}/bin/llvm-profdata",
                  *map(str, Path(sysroot).glob("lib/rustlib/*/bin/llvm-profdata")),  # rustup's llvm-tools
                  shutil.which("llvm-profdata")]
    for tool in filter(None, candidates):
        if not Path(tool).is_file():
            continue
        version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        if re.search(rf"LLVM version {major}\.", version):
            return tool
    raise SystemExit(f"no llvm-profdata for LLVM {major} (rustc's): apt-get install llvm-{major}")


def cargo_build(target_dir, rustflags, *targets):
    flags = " ".join(filter(None, [os.environ.get("RUSTFLAGS", ""), rustflags]))
    env = {**os.environ, "CARGO_TARGET_DIR": str(target_dir), "RUSTFLAGS": flags}
    subprocess.run(["cargo", "build", "--release", *targets], cwd=ROOT, env=env, check=True)


def train(raw):
    """The benchmark's own load, on the instrumented servers."""
    binaries = GENERATE / "release"
    with tempfile.TemporaryDirectory(prefix="tokenwarden-pgo-") as work, stopping():
        ref_port = free_port()
        reference = Process([binaries / "examples" / "bench-reference", ref_port])
        ref_url = f"http://127.0.0.1:{ref_port}"
        wait_http(f"{ref_url}/healthz")
        for alg in ("HS512", "ES256", "EdDSA"):
            log(f"training on {alg}")
            tw = Tokenwarden(work, alg, binary=binaries / "tokenwarden")
            warm, cold = tw.tokens(SESSIONS, NEVER_SEEN if alg == "HS512" else 0)
            pid = [tw.proc.pid]
            wrk(tw.base, warm, "forward-auth", SECONDS, pids=pid)
            wrk(tw.base, warm, "forward-auth", SECONDS, pids=pid)
            wrk(tw.base, warm, "verify", SECONDS, app_key=tw.app_key, pids=pid)
            wrk(tw.base, warm, "forward-auth", SECONDS, connections=16, rate=2000, pids=pid)
            if alg == "HS512":
                wrk(tw.base, cold, "forward-auth", SECONDS, pids=pid)
                wrk(ref_url, warm, "forward-auth", SECONDS, pids=[reference.pid])
                wrk(ref_url, warm, "verify", SECONDS, pids=[reference.pid])
                wrk(ref_url, warm, "forward-auth", SECONDS, connections=16, rate=2000, pids=[reference.pid])
            tw.proc.stop()
            if tw.proc.proc.returncode != 0:
                raise SystemExit(f"the instrumented tokenwarden ({alg}) exited with "
                                 f"{tw.proc.proc.returncode}: its profile may be incomplete")
        reference.stop()
        if reference.proc.returncode != 0:
            raise SystemExit(f"the instrumented reference exited with {reference.proc.returncode}")
    # One per process: three key generations, three servers and the reference.
    profiles = [p for p in sorted(raw.glob("*.profraw")) if p.stat().st_size > 0]
    if len(profiles) != 7:
        raise SystemExit(f"training wrote {len(profiles)} profiles in {raw}, expected 7")
    return profiles


def main():
    if SERVER_CORE not in {str(c) for c in os.sched_getaffinity(0)}:
        raise SystemExit(f"core {SERVER_CORE} is not available to this process")
    for tool in ("wrk", "taskset", "git"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing")
    profdata = llvm_profdata()
    stamp = build_inputs_stamp()
    log(f"building from {stamp}; merging with {profdata}")

    build(pgo=True)  # the plain bench-tokens helper, which writes the training's tokens

    raw = GENERATE / "profiles"
    log("instrumented build (target/pgo-generate)")
    cargo_build(GENERATE, f"-Cprofile-generate={raw}", "--bin", "tokenwarden", "--example", "bench-reference")
    # RUSTFLAGS instrument the build scripts and proc macros too, and the build ran
    # them: only the training's own profiles may be merged.
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)

    os.environ["LLVM_PROFILE_FILE"] = str(raw / "%m-%p.profraw")
    profiles = train(raw)
    merged = PGO / "merged.profdata"
    merged.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([profdata, "merge", "-o", merged, *profiles], check=True)
    log(f"merged {len(profiles)} profiles into {merged}")

    log("optimised build (target/pgo)")
    PGO_STAMP.unlink(missing_ok=True)
    cargo_build(PGO, f"-Cprofile-use={merged} -Cllvm-args=-pgo-warn-missing-function=false",
                "--bin", "tokenwarden", "--example", "bench-reference")
    if build_inputs_stamp() != stamp:
        stamp = stamp.split()[0] + " with uncommitted changes"  # the sources moved during the build
    PGO_STAMP.write_text(stamp + "\n")
    log(f"done: {PGO / 'release' / 'tokenwarden'} and {PGO / 'release' / 'examples' / 'bench-reference'}, "
        f"from {stamp}; now python3 bench/run.py --pgo")


if __name__ == "__main__":
    main()
