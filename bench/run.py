"""``make bench``: time ``nnxport convert --no-parity`` against the floor, the seed guide's way and the
import baseline on a Llama-3.2-1B-shaped checkpoint at 1x and 2x depth, check the targets, and write
docs/benchmarks.md.

Every case runs in a fresh interpreter; its wall time is measured around the child, its peak RSS is the
child's own ``ru_maxrss`` from ``os.wait4`` (per child, not the cumulative ``RUSAGE_CHILDREN``). The
checkpoint files are read once before each run (untimed) so every case starts with them in the page
cache, each output folder is deleted and ``sync``-ed between runs, and the repeats are interleaved
(rep 1 of every case, then rep 2, ...) so that a noisy moment on a shared machine does not hit one case
only. Wall time: best of the repeats, with the spread (slowest - best); peak RSS: the largest of the
same runs.

The memory-limited run converts the 2x checkpoint under a cgroup v1 memory limit smaller than the
checkpoint (a child group of the runner's own memory cgroup, removed afterwards), and runs the floor
under the same limit for contrast. It is skipped, with a note, where cgroup v1 memory is not writable.

Then bench/generate.py measures generation (tokens/s against transformers' generate) and bench/limits.py
nnxport against the physical limit (imports + synced disk writes), the compression choice, restore speed,
streamed parity's memory and a Llama-3.1-8B-shaped checkpoint; each writes its own section of the doc.

    python bench/run.py [--repeat 2] [--sizes 1,2] [--cache .bench] [--doc docs/benchmarks.md]
                        [--no-generate] [--no-limits] [--no-big]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
LAYERS = {1: 16, 2: 32}  # size factor -> num_hidden_layers (published Llama-3.2-1B: 16)
CASES = ("imports", "floor", "seed", "nnxport", "mesh")
LABELS = {
    "imports": "imports only (baseline)",
    "floor": "floor (read all + one Orbax save)",
    "seed": "seed guide's way (torch -> jnp -> Orbax)",
    "nnxport": "nnxport convert --no-parity",
    "mesh": "nnxport convert --no-parity --mesh data=2,model=4 (8 CPU devices)",
}
WALL_VS_FLOOR = 1.2  # target 1: nnxport wall <= 1.2x the floor
RSS_BYTES_FACTOR = 1.1  # target 1: peak RSS <= baseline + 1.1x the checkpoint bytes
FLAT_TOLERANCE = 0.10  # target 2: peak RSS at 2x within +-10% of 1x
RUN_TIMEOUT_S = 1800
GB = 1e9
GIB = 2**30

case_out_bytes: dict[tuple[str, int], int] = {}
"""On-disk size of each case's output (first repeat), by (case, size)."""


@dataclass
class Run:
    """One run of one case: wall seconds, the child's peak RSS in bytes, exit code, stderr tail."""

    wall: float
    rss: int
    rc: int
    err: str = ""


@dataclass
class Case:
    name: str
    size: int  # 0 for the size-independent baseline
    argv: list[str]
    out: Path | None
    runs: list[Run] = field(default_factory=list)

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.rc == 0]

    @property
    def wall(self) -> float | None:
        return min(r.wall for r in self.ok) if self.ok else None

    @property
    def spread(self) -> float | None:
        return max(r.wall for r in self.ok) - min(r.wall for r in self.ok) if self.ok else None

    @property
    def rss(self) -> int | None:
        return max(r.rss for r in self.ok) if self.ok else None


def rel(path: Path | str) -> str:
    """``path`` relative to the repository root when it is inside it (for the commands shown)."""
    p = Path(os.path.abspath(path))  # not resolve(): .venv/bin/python is a symlink
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def show(argv: Sequence[str]) -> str:
    """A command line as it can be pasted in the repository root."""
    return shlex.join(rel(a) if os.path.isabs(a) else a for a in argv)


def measure(argv: Sequence[str], *, timeout: float = RUN_TIMEOUT_S) -> Run:
    """Run ``argv`` as a child; wall time around it and its own peak RSS from ``os.wait4``."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    tail: list[bytes] = []

    def drain() -> None:  # keep the pipe from filling; keep the last lines
        assert proc.stderr is not None
        for line in proc.stderr:
            tail.append(line)
            del tail[:-20]

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    killer = threading.Timer(timeout, os.kill, (proc.pid, signal.SIGKILL))
    killer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return Run(wall, rss, proc.returncode, b"".join(tail).decode(errors="replace").strip())


def read_files(folder: Path) -> None:
    """Read every file of ``folder`` once, so the timed run finds them in the page cache."""
    for path in sorted(folder.iterdir()):
        with path.open("rb", buffering=0) as f:
            while f.read(64 * 2**20):
                pass


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def make_checkpoints(cache: Path, sizes: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Build (or reuse) the checkpoint of each size under ``cache``; their ``bench.json`` stamps."""
    stamps = {}
    for size in sizes:
        folder = cache / f"llama-3.2-1b-{LAYERS[size]}l"
        argv = [sys.executable, str(BENCH / "make_checkpoint.py"), str(folder), "--layers", str(LAYERS[size])]
        print(f"checkpoint {size}x: {show(argv)}", file=sys.stderr, flush=True)
        subprocess.run(argv, cwd=ROOT, check=True)
        stamps[size] = {**json.loads((folder / "bench.json").read_text()), "folder": folder,
                        "command": show(argv)}
    return stamps


def case_argv(name: str, source: Path | None, out: Path | None) -> list[str]:
    py = sys.executable
    if name == "imports":
        return [py, str(BENCH / "imports.py")]
    assert source is not None and out is not None
    if name == "floor":
        return [py, str(BENCH / "floor.py"), str(source), str(out)]
    if name == "seed":
        return [py, str(BENCH / "seed_way.py"), str(source), str(out)]
    argv = [py, "-m", "nnxport", "convert", str(source), "--no-parity", "--out", str(out), "--force", "-q"]
    if name == "mesh":  # 8 simulated CPU devices; each reads its own parts of the sharded tensors
        flags = "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        return ["env", flags, *argv, "--mesh", "data=2,model=4"]
    return argv


def run_cases(cases: list[Case], stamps: dict[int, dict[str, Any]], repeat: int) -> None:
    """Every case ``repeat`` times, interleaved; outputs checked, then deleted."""
    for rep in range(1, repeat + 1):
        for case in cases:
            if case.size:
                read_files(stamps[case.size]["folder"])
            if case.out is not None:
                shutil.rmtree(case.out, ignore_errors=True)
            os.sync()
            run = measure(case.argv)
            if run.rc == 0 and case.out is not None:
                written = case.out / "checkpoint" if case.name in ("nnxport", "mesh") else case.out
                if not (written / "commit_success.txt").is_file() and not (written / "_METADATA").is_file():
                    run.rc, run.err = -1, f"no finished Orbax checkpoint in {rel(written)}"
                elif rep == 1:
                    case_out_bytes[(case.name, case.size)] = tree_bytes(case.out)
            case.runs.append(run)
            status = "ok" if run.rc == 0 else f"FAILED (exit {run.rc}): {run.err.splitlines()[-1:]}"
            print(f"  rep {rep}: {case.name:8s} {case.size or '-'}x  {run.wall:7.2f} s  "
                  f"{run.rss / GB:6.2f} GB peak RSS  {status}", file=sys.stderr, flush=True)
            if case.out is not None:
                shutil.rmtree(case.out, ignore_errors=True)
                os.sync()


# ---------------------------------------------------------------------------------------------------------
# memory-limited run (cgroup v1)


def own_memory_cgroup() -> Path | None:
    """The cgroup v1 memory folder this process is in, if there is one and it is writable."""
    base = Path("/sys/fs/cgroup/memory")
    if not (base / "memory.limit_in_bytes").is_file():
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = base / path.lstrip("/")
            return folder if os.access(folder, os.W_OK) else None
    return None


def limited_run(argv: list[str], limit: int, tag: str) -> dict[str, Any]:
    """Run ``argv`` inside a new memory cgroup limited to ``limit`` bytes; the outcome and the
    cgroup's counters. The child joins the group itself before exec (``echo $$ > cgroup.procs``), so
    everything it allocates is charged there."""
    parent = own_memory_cgroup()
    if parent is None:
        return {"skipped": "cgroup v1 memory controller not found or not writable "
                           "(/sys/fs/cgroup/memory); the memory-limited run needs root and cgroup v1"}
    group = parent / f"nnxport-bench-{tag}-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        memsw = group / "memory.memsw.limit_in_bytes"
        if memsw.is_file():  # no swapping out of the limit either
            memsw.write_text(str(limit))
        wrapped = ["sh", "-c", f'echo $$ > {shlex.quote(str(group / "cgroup.procs"))} && exec "$@"', "sh",
                   *argv]
        run = measure(wrapped)
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return {
            "limit": limit, "rc": run.rc, "wall": run.wall, "rss": run.rss, "err": run.err,
            "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
            "failcnt": int((group / "memory.failcnt").read_text()),
            "oom_kill": int(oom.get("oom_kill", -1)),
            "command": (f"mkdir {group}; echo {limit} > {group}/memory.limit_in_bytes; "
                        f"sh -c 'echo $$ > {group}/cgroup.procs && exec \"$@\"' sh {show(argv)}"),
        }
    finally:
        for _ in range(50):  # the group empties a moment after the child is reaped
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
        ram = f"{mem_kb * 1024 / GIB:.1f} GiB"
    except (OSError, StopIteration):
        ram = "?"
    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint", "tensorstore", "torch", "transformers",
                "safetensors", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return {
        "CPU": f"{cpu}, {os.cpu_count()} cores",
        "RAM": ram,
        "OS": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "nnxport": f"commit {commit}" + (" + uncommitted changes" if dirty else ""),
    }


def fmt_gb(x: float | None) -> str:
    return "—" if x is None else f"{x / GB:.2f}"


def fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return "—" if a is None or not b else f"{a / b:.{digits}f}×"


def verdict(ok: bool | None) -> str:
    return {True: "**holds**", False: "**does not hold**", None: "**not measured**"}[ok]


def build_report(cases: list[Case], stamps: dict[int, dict[str, Any]], limited: dict[str, Any] | None,
                 contrast: dict[str, Any] | None, info: dict[str, Any]) -> tuple[str, str, list[str]]:
    """(the markdown document, the results table, one line per target)."""
    by = {(c.name, c.size): c for c in cases}
    base = by[("imports", 0)]
    sizes = sorted(stamps)
    rows = ["| case | size | checkpoint GB | wall s (best) | spread s | GB/s | × floor wall | peak RSS GB "
            "| peak − baseline, × checkpoint | RSS budget GB (baseline + 1.1×) | output GB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows.append(f"| {LABELS['imports']} | — | — | {fmt_s(base.wall)} | {fmt_s(base.spread)} | — | — | "
                f"{fmt_gb(base.rss)} | — | — | — |")
    for size in sizes:
        nbytes = stamps[size]["bytes"]
        floor = by.get(("floor", size))
        for name in CASES[1:]:
            c = by.get((name, size))
            if c is None:
                continue
            gbps = "—" if c.wall is None else f"{nbytes / GB / c.wall:.2f}"
            extra = "—" if c.rss is None or base.rss is None else f"{(c.rss - base.rss) / nbytes:.2f}×"
            allowed = "—" if base.rss is None else fmt_gb(base.rss + RSS_BYTES_FACTOR * nbytes)
            n_failed = len(c.runs) - len(c.ok)
            failed = f" ({n_failed} of {len(c.runs)} runs failed)" if n_failed else ""
            rows.append(f"| {LABELS[name]}{failed} | {size}× ({LAYERS[size]} layers) | {nbytes / GB:.2f} | "
                        f"{fmt_s(c.wall)} | {fmt_s(c.spread)} | {gbps} | "
                        f"{ratio(c.wall, floor.wall if floor else None)} | {fmt_gb(c.rss)} | {extra} | "
                        f"{allowed} | {fmt_gb(case_out_bytes.get((name, size)))} |")
    table = "\n".join(rows)

    growth = []
    if 1 in stamps and 2 in stamps:
        growth = ["| case | checkpoint bytes 2×/1× | wall 2×/1× | peak RSS 2×/1× | "
                  "peak − baseline 2×/1× |", "|---|---|---|---|---|"]
        bytes_ratio = stamps[2]["bytes"] / stamps[1]["bytes"]
        for name in CASES[1:]:
            one, two = by.get((name, 1)), by.get((name, 2))
            if one is None or two is None:
                continue
            above = ("—" if one.rss is None or two.rss is None or base.rss is None
                     else ratio(two.rss - base.rss, one.rss - base.rss))
            growth.append(f"| {LABELS[name]} | {bytes_ratio:.2f}× | {ratio(two.wall, one.wall)} | "
                          f"{ratio(two.rss, one.rss)} | {above} |")

    targets: list[str] = []
    nnx1, floor1 = by.get(("nnxport", 1)), by.get(("floor", 1))
    if nnx1 is not None and floor1 is not None:
        ok = None if nnx1.wall is None or floor1.wall is None else nnx1.wall <= WALL_VS_FLOOR * floor1.wall
        targets.append(f"1a. Wall time ≤ {WALL_VS_FLOOR}× the floor (1×): nnxport {fmt_s(nnx1.wall)} s "
                       f"vs floor {fmt_s(floor1.wall)} s = {ratio(nnx1.wall, floor1.wall)} — {verdict(ok)}.")
        for size in sizes[1:]:
            n, f = by.get(("nnxport", size)), by.get(("floor", size))
            if n is not None and f is not None:
                targets.append(f"    (at {size}×: {fmt_s(n.wall)} s vs {fmt_s(f.wall)} s = "
                               f"{ratio(n.wall, f.wall)})")
        nbytes = stamps[1]["bytes"]
        budget = None if base.rss is None else base.rss + RSS_BYTES_FACTOR * nbytes
        ok = None if nnx1.rss is None or budget is None else nnx1.rss <= budget
        targets.append(f"1b. Peak RSS ≤ import baseline + {RSS_BYTES_FACTOR}× checkpoint (1×): "
                       f"{fmt_gb(nnx1.rss)} GB vs {fmt_gb(base.rss)} + {RSS_BYTES_FACTOR} × "
                       f"{nbytes / GB:.2f} = {fmt_gb(budget)} GB — {verdict(ok)}.")
    nnx2 = by.get(("nnxport", 2))
    if nnx1 is not None and nnx2 is not None:
        r = None if nnx1.rss is None or nnx2.rss is None else nnx2.rss / nnx1.rss
        shown = "—" if r is None else f"{r:.3f}×"
        ok = None if r is None else abs(r - 1) <= FLAT_TOLERANCE
        targets.append(f"2a. Streaming: the same peak RSS (±{FLAT_TOLERANCE:.0%}) at 1× and 2×: "
                       f"{fmt_gb(nnx1.rss)} GB and {fmt_gb(nnx2.rss)} GB = "
                       f"{shown} for {stamps[2]['bytes'] / stamps[1]['bytes']:.2f}× the bytes — "
                       f"{verdict(ok)}.")
    if limited is not None:
        if "skipped" in limited:
            targets.append(f"2b. Larger than the memory allowed: skipped ({limited['skipped']}) — "
                           f"{verdict(None)}.")
        else:
            ok = limited["rc"] == 0 and limited["oom_kill"] <= 0
            limit = limited["limit"]
            targets.append(f"2b. Larger than the memory allowed: the {limited['ckpt_bytes'] / GB:.2f} GB "
                           f"checkpoint under a {limit / GB:.2f} GB ({limit / GIB:.2f} GiB) cgroup limit: "
                           f"exit {limited['rc']}, oom_kill {limited['oom_kill']}, "
                           f"{limited['wall']:.1f} s, peak RSS {fmt_gb(limited['rss'])} GB — {verdict(ok)}.")
    if growth:
        targets.append("3. Throughput (GB/s) and growth from 1× to 2× are in the tables above — reported.")

    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`bench/run.py`); rerun it to refresh this page. The explanation below is "
        "part of `bench/run.py`, the numbers come from the run.",
        "",
        EXPLANATION.strip(),
        "",
        "## Run",
        "",
        f"- Date: {info['date']} (took {info['took'] / 60:.1f} min)",
        *[f"- {k}: {v}" for k, v in info["machine"].items()],
        f"- Load average (1 min) at start / end: {info['load'][0]:.2f} / {info['load'][1]:.2f} "
        "(the machine is shared: other work ran alongside)",
        f"- Repeats: {info['repeat']} per case, interleaved; wall = best, spread = slowest − best, "
        "peak RSS = largest of the same runs",
        "",
        "## Results",
        "",
        table,
        "",
    ]
    if growth:
        lines += ["### Growth from 1× to 2×", "", *growth, "",
                  "The 2× checkpoint doubles the layers (16 → 32); the embedding (0.53 GB) stays, so it has "
                  f"{stamps[2]['bytes'] / stamps[1]['bytes']:.2f}× the bytes, not 2×.", ""]
    lines += ["## Targets", ""]
    lines += [f"  {t.strip()}" if t.startswith("    ") else f"- {t}" for t in targets]
    lines += [""]
    lines += ["## Memory-limited run", ""]
    if limited is None:
        lines += ["Not run (`--no-limit-run`).", ""]
    elif "skipped" in limited:
        lines += [f"Skipped: {limited['skipped']}.", ""]
    else:
        lines += ["| run | limit GB | exit | oom_kill | failcnt | wall s | peak RSS GB | cgroup max usage GB "
                  "|", "|---|---|---|---|---|---|---|---|"]
        big = f"{max(sizes)}× ({stamps[max(sizes)]['bytes'] / GB:.2f} GB)"
        pairs = ((f"nnxport convert --no-parity, {big}", limited), (f"floor, {big} (contrast)", contrast))
        for label, res in pairs:
            if res is None or "skipped" in res:
                continue
            lines.append(f"| {label} | {res['limit'] / GB:.2f} | {res['rc']} | {res['oom_kill']} | "
                         f"{res['failcnt']} | {res['wall']:.1f} | {fmt_gb(res['rss'])} | "
                         f"{fmt_gb(res['max_usage'])} |")
        lines += ["", LIMIT_NOTE.strip(), ""]
    lines += ["## Commands", "", "Run from the repository root (`make bench` runs `.venv/bin/python "
              "bench/run.py`).", "", "```"]
    lines += [f"# build the {s}× checkpoint (reused when present)\n{stamps[s]['command']}" for s in sizes]
    for c in cases:
        lines.append(f"# {LABELS[c.name]}" + (f", {c.size}×" if c.size else ""))
        lines.append(show(c.argv))
    if limited is not None and "command" in limited:
        lines.append("# memory-limited run (cgroup v1; the group is removed afterwards)")
        lines.append(limited["command"])
        if contrast is not None and "command" in contrast:
            lines.append(contrast["command"])
    lines += ["```", ""]
    return "\n".join(lines), table, targets


EXPLANATION = """
## What is measured

Checkpoints: random-weight bf16 checkpoints shaped like `meta-llama/Llama-3.2-1B` (tied embeddings, no
`lm_head`), in hub format (3 safetensors shards, `model.safetensors.index.json`, the published
`config.json`), built by `bench/make_checkpoint.py` into `.bench/` (git-ignored) and reused across runs.
**1×** is the published depth (16 layers, 2.47 GB); **2×** has 32 layers.

Cases, each in a fresh Python process (so every wall time includes the interpreter start and the imports):

- **imports only** (`bench/imports.py`): jax, flax, orbax, torch and transformers imported, the jax CPU
  backend started. Its peak RSS is the *baseline* in the memory target.
- **floor** (`bench/floor.py`): the least a converter must do. Every tensor read with `safe_open`
  (numpy, stored dtype) and all of them saved with one Orbax `StandardCheckpointer.save`; no key mapping,
  no model, no parity.
- **seed guide's way** (`bench/seed_way.py`): what the Flax guide the project grew from does: the torch
  state dict (`safetensors.torch.load_file`), `jnp.asarray` per tensor (through float32 for bf16, which
  torch cannot hand to numpy, cast back to bf16 as the guide's `.astype(target dtype)` does), one Orbax
  save. No mapping or model either.
- **nnxport convert --no-parity**: the real command on the checkpoint folder: config, mapping, abstract
  NNX model, every tensor read, mapped, placed and written to the Orbax checkpoint, manifest.
- **--mesh data=2,model=4**: the same with 8 simulated CPU devices (`XLA_FLAGS`), the large matrices
  sharded as the decoder mapping's `shard` entries say, every device's part read on its own
  (docs/sharding.md). Not one of the targets; it shows what per-device reads cost on one host.

Peak RSS is the child's own `ru_maxrss` (resident memory high-water mark, page cache not included). The
output sizes on disk are smaller than the checkpoint because Orbax compresses and the random values have
only a few distinct exponents; real weights compress less.

Targets (from the issue): (1) nnxport's wall time ≤ 1.2× the floor's and its peak RSS ≤ the import
baseline + 1.1× the checkpoint bytes; (2) streaming: the same peak RSS (±10%) at 1× and 2×, and a
checkpoint larger than the memory the process may use converts; (3) throughput and growth reported.
"""

LIMIT_NOTE = """
The limit is a cgroup v1 memory group (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where
present, so swap cannot absorb it), created under the runner's own memory cgroup; the child writes its pid
into `cgroup.procs` before exec, so everything it allocates is charged there. A cgroup is charged for page
cache too (the checkpoint files read, the output written): `max usage` includes that cache and reaches the
limit whenever the kernel reclaims cache instead of failing, and `failcnt` counts those reclaims. What
decides the outcome is the exit code and `oom_kill` (processes the kernel killed for exceeding the limit).
The floor under the same limit shows that the limit is real: a one-shot save needs all the arrays at once.
"""


def parse_size(text: str) -> int:
    """``3GiB``, ``3.5GB``, ``3000000000`` -> bytes."""
    t = text.strip().lower()
    for suffix, unit in (("gib", GIB), ("gb", GB), ("mib", 2**20), ("mb", 10**6)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * unit)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2, help="runs per case (best wall time is reported)")
    parser.add_argument("--sizes", default="1,2", help="checkpoint sizes to run: 1 (16 layers), 2 (32)")
    parser.add_argument("--cases", default=",".join(CASES[1:]), help="cases to run besides the baseline")
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench", help="checkpoints and outputs")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="markdown file written (- for none)")
    parser.add_argument("--mem-limit", type=parse_size, default=parse_size("3GiB"),
                        help="cgroup memory limit of the memory-limited run (default 3GiB); must be below "
                             "the 2x checkpoint's size")
    parser.add_argument("--no-limit-run", action="store_true", help="skip the memory-limited run")
    parser.add_argument("--no-generate", action="store_true",
                        help="skip the generation benchmark (bench/generate.py)")
    parser.add_argument("--no-limits", action="store_true",
                        help="skip bench/limits.py (physical limit, compression, restore, parity memory)")
    parser.add_argument("--no-big", action="store_true",
                        help="bench/limits.py without the 16 GB Llama-3.1-8B-shaped checkpoint")
    args = parser.parse_args(argv)
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    names = [n for n in CASES[1:] if n in args.cases.split(",")]
    if any(s not in LAYERS for s in sizes) or not names or args.repeat < 1:
        parser.error("--sizes takes 1 and/or 2, --cases some of floor,seed,nnxport, --repeat >= 1")

    started, t0, load0 = datetime.datetime.now().astimezone(), time.perf_counter(), os.getloadavg()[0]
    args.cache.mkdir(parents=True, exist_ok=True)
    stamps = make_checkpoints(args.cache, sizes)
    free = shutil.disk_usage(args.cache).free
    if free < 2 * max(s["bytes"] for s in stamps.values()):
        print(f"warning: only {free / GB:.1f} GB free under {args.cache}", file=sys.stderr)

    out_root = args.cache / "out"
    cases = [Case("imports", 0, case_argv("imports", None, None), None)]
    for size in sizes:
        for name in names:
            out = out_root / f"{name}-{size}x"
            cases.append(Case(name, size, case_argv(name, stamps[size]["folder"], out), out))
    print(f"running {len(cases)} cases x {args.repeat}", file=sys.stderr, flush=True)
    run_cases(cases, stamps, args.repeat)

    limited = contrast = None
    if not args.no_limit_run:
        big = max(sizes)
        stamp = stamps[big]
        if args.mem_limit >= stamp["bytes"]:
            print(f"note: --mem-limit {args.mem_limit / GB:.2f} GB is not below the {big}x checkpoint "
                  f"({stamp['bytes'] / GB:.2f} GB)", file=sys.stderr)
        print(f"memory-limited run: {big}x checkpoint under {args.mem_limit / GB:.2f} GB", file=sys.stderr,
              flush=True)
        for name in ("nnxport", "floor"):
            out = out_root / f"{name}-{big}x-limited"
            shutil.rmtree(out, ignore_errors=True)
            read_files(stamp["folder"])
            os.sync()
            result = limited_run(case_argv(name, stamp["folder"], out), args.mem_limit, name)
            result["ckpt_bytes"] = stamp["bytes"]
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k not in ('command', 'err')})}",
                  file=sys.stderr, flush=True)
            if name == "nnxport":
                limited = result
                if "skipped" in result:
                    break
            else:
                contrast = result
    shutil.rmtree(out_root, ignore_errors=True)

    info = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "took": time.perf_counter() - t0,
            "load": (load0, os.getloadavg()[0]), "machine": machine(), "repeat": args.repeat}
    doc, table, targets = build_report(cases, stamps, limited, contrast, info)
    if str(args.doc) != "-":
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(doc)
        print(f"wrote {rel(args.doc)}", file=sys.stderr)
    print(table)
    print()
    print("\n".join(targets))
    generated = 0
    if not args.no_generate:  # tokens/s against transformers' generate; its own section of the doc
        doc_args = [] if str(args.doc) == "-" else ["--doc", str(args.doc)]
        generated = subprocess.run([sys.executable, str(BENCH / "generate.py"), "--cache",
                                    str(args.cache / "generate"), *doc_args], check=False).returncode
    limits = 0
    if not args.no_limits:  # its own section of the doc
        doc_args = [] if str(args.doc) == "-" else ["--doc", str(args.doc)]
        limits = subprocess.run([sys.executable, str(BENCH / "limits.py"), "--cache", str(args.cache),
                                 "--repeat", str(args.repeat), *([] if args.no_big else ["--big"]),
                                 *doc_args], check=False).returncode
    return 0 if all(c.ok for c in cases) and generated == 0 and limits == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
