"""``make bench``, second part: nnxport against the machine's physical limit, the compression choice, restore
speed, parity memory (streamed) and an 8B-shaped checkpoint, written into docs/benchmarks.md's section
between ``<!-- limits-bench -->`` markers.

The physical limit of a conversion is the imports it cannot avoid (jax, flax, orbax: a fresh interpreter
that imports them and starts the CPU backend) plus the checkpoint's bytes written to the output filesystem
at the speed it takes them durably (``dd if=/dev/zero bs=1M conv=fdatasync``, the same bytes, same
folder), both measured in this run. nnxport's wall time is reported as a ratio to it. Everything else is
as in bench/run.py (fresh interpreter per case, page cache warmed, best of interleaved repeats, peak RSS
from ``os.wait4``), whose helpers this reuses.

    python bench/limits.py [--repeat 2] [--sizes 1,2] [--big] [--cache .bench] [--doc docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # bench/generate.py: splice
import run as base

MARK = "<!-- limits-bench -->"
LIMIT_FACTOR = 1.2  # convert --no-parity wall <= 1.2x the physical limit
RSS_LIMIT = 1.5e9  # convert --no-parity peak RSS
PARITY_RSS_LIMIT = 3e9  # convert with (streamed) parity peak RSS
BIG_REPO = "meta-llama/Llama-3.1-8B"
PY = sys.executable
ONCE = {"convert with parity (streamed)"}  # minutes each: run once, not repeated


def _convert(src: Path, out: Path, *extra: str, parity: bool = False) -> list[str]:
    return [PY, "-m", "nnxport", "convert", str(src), "--out", str(out), "--force", "-q",
            *([] if parity else ["--no-parity"]), *extra]


def cases_for(src: Path, out: Path, nbytes: int) -> dict[str, list[str]]:
    """Label -> argv of the timed cases of one checkpoint."""
    blocks = math.ceil(nbytes / 2**20)
    return {
        "imports (jax, flax, orbax)": [PY, "-c", "import jax, flax.nnx, orbax.checkpoint; jax.devices()"],
        "dd conv=fdatasync, same bytes": ["dd", "if=/dev/zero", f"of={out}.dd", "bs=1M", f"count={blocks}",
                                          "conv=fdatasync", "status=none"],
        "convert --no-parity (default: --compression none)": _convert(src, out),
        "convert --no-parity --compression zstd": _convert(src, out, "--compression", "zstd"),
        "convert --no-parity --mesh data=2,model=4": [
            "env", "XLA_FLAGS=--xla_force_host_platform_device_count=8",
            *_convert(src, out, "--mesh", "data=2,model=4")],
        "convert with parity (streamed)": _convert(src, out, parity=True),
    }


def run_timed(argvs: dict[str, list[str]], src: Path, out: Path, repeat: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for rep in range(repeat):
        for label, argv in argvs.items():
            if rep and label in ONCE:
                continue
            base.read_files(src)
            shutil.rmtree(out, ignore_errors=True)
            Path(f"{out}.dd").unlink(missing_ok=True)
            subprocess.run(["sync"], check=False)
            r = base.measure(argv)
            size = base.tree_bytes(out / "checkpoint") if (out / "checkpoint").is_dir() else None
            passed = None
            if (out / "parity.json").is_file():
                passed = json.loads((out / "parity.json").read_text())["passed"]
            entry = results.setdefault(label, {"walls": [], "rss": 0, "rc": 0, "argv": argv})
            entry["walls"].append(r.wall)
            entry["rss"] = max(entry["rss"], r.rss)
            entry["rc"] = entry["rc"] or r.rc
            entry["out_bytes"] = size if size is not None else entry.get("out_bytes")
            entry["passed"] = passed if passed is not None else entry.get("passed")
            print(f"  rep {rep + 1}: {label:52s} {r.wall:7.2f} s {r.rss / 1e9:6.2f} GB rc {r.rc}"
                  + (f" {r.err.splitlines()[-1:]}" if r.rc else ""), file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    Path(f"{out}.dd").unlink(missing_ok=True)
    return results


def load_speed(src: Path, out: Path, compression: str) -> dict[str, Any]:
    """One untimed conversion, then bench/load.py in a fresh interpreter: restore and source-read rates."""
    subprocess.run(_convert(src, out, "--compression", compression), check=True)
    report = out.with_name(out.name + ".load.json")
    r = base.measure([PY, str(base.BENCH / "load.py"), str(out), str(src), str(report)])
    data = json.loads(report.read_text()) if r.rc == 0 else {}
    report.unlink(missing_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    return {**data, "rss": r.rss, "rc": r.rc}


def best(entry: dict[str, Any]) -> float:
    return min(entry["walls"])


def section(stamps: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]],
            loads: dict[str, dict[str, dict[str, Any]]], info: dict[str, Any]) -> tuple[str, list[str]]:
    lines = [MARK, "", "## The physical limit, compression, restore and parity memory", "",
             EXPLANATION.strip(), "", f"Run {info['date']}, {info['repeat']} repeats, load average "
             f"{info['load'][0]:.2f} / {info['load'][1]:.2f}, {info['machine']['nnxport']}.", ""]
    targets: list[str] = []
    for name, stamp in stamps.items():
        res, nbytes = results[name], stamp["bytes"]
        imports, dd = best(res["imports (jax, flax, orbax)"]), best(res["dd conv=fdatasync, same bytes"])
        limit = imports + dd
        lines += [f"### {name}: {stamp['repo']}, {stamp['layers'] or 'published'} layers, "
                  f"{nbytes / 1e9:.2f} GB bf16, {stamp['tensors']} tensors", "",
                  f"Physical limit: imports {imports:.1f} s + {nbytes / 1e9:.2f} GB at "
                  f"{nbytes / dd / 1e9:.2f} GB/s = **{limit:.1f} s**.", "",
                  "| case | wall s (best) | spread s | × limit | peak RSS GB | checkpoint on disk GB | exit "
                  "| parity |", "|---|---|---|---|---|---|---|---|"]
        for label, entry in res.items():
            w = best(entry)
            on_disk = "—" if entry.get("out_bytes") is None else f"{entry['out_bytes'] / 1e9:.2f}"
            passed = {True: "passed", False: "FAILED", None: "—"}[entry.get("passed")]
            lines.append(f"| {label} | {w:.1f} | {max(entry['walls']) - w:.1f} | {w / limit:.2f}× | "
                         f"{entry['rss'] / 1e9:.2f} | {on_disk} | {entry['rc']} | {passed} |")
        lines.append("")
        conv = res["convert --no-parity (default: --compression none)"]
        ok = best(conv) <= LIMIT_FACTOR * limit
        targets.append(f"{name}: convert --no-parity {best(conv):.1f} s ≤ {LIMIT_FACTOR}× the limit "
                       f"{limit:.1f} s ({best(conv) / limit:.2f}×) — {base.verdict(ok)}.")
        targets.append(f"{name}: convert --no-parity peak RSS {conv['rss'] / 1e9:.2f} GB ≤ "
                       f"{RSS_LIMIT / 1e9:.1f} GB — {base.verdict(conv['rss'] <= RSS_LIMIT)}.")
        par = res.get("convert with parity (streamed)")
        if par is not None:
            good = par["rc"] == 0 and par.get("passed") is True
            targets.append(f"{name}: convert with parity peak RSS {par['rss'] / 1e9:.2f} GB ≤ "
                           f"{PARITY_RSS_LIMIT / 1e9:.0f} GB, parity "
                           f"{'passed' if good else 'FAILED'} — "
                           f"{base.verdict(good and par['rss'] <= PARITY_RSS_LIMIT)}.")
        if name in loads:
            lines += ["| restore (`nnxport.load`) | GB/s | s | peak RSS GB |", "|---|---|---|---|"]
            for comp, d in loads[name].items():
                if d.get("rc") == 0:
                    lines.append(f"| checkpoint written with --compression {comp} | "
                                 f"{d['bytes'] / d['load_s'] / 1e9:.2f} | {d['load_s']:.1f} | "
                                 f"{d['rss'] / 1e9:.2f} |")
            d = next(iter(loads[name].values()))
            if d.get("rc") == 0:
                lines.append(f"| (contrast) every source tensor read from the safetensors | "
                             f"{d['bytes'] / d['source_s'] / 1e9:.2f} | {d['source_s']:.1f} | — |")
            lines.append("")
    lines += ["### Targets", "", *[f"- {t}" for t in targets], "", "### Commands", "", "```"]
    for name, stamp in stamps.items():
        lines.append(f"# {name}: {stamp['command']}")
        for label, entry in results[name].items():
            lines.append(f"# {label}\n{base.show(entry['argv'])}")
    lines += ["```", "", MARK]
    return "\n".join(lines), targets


EXPLANATION = """
Measured by `bench/limits.py` (called by `make bench` after `bench/run.py`); the checkpoints hold
normal(0, 0.02) bf16 weights (norm scales 1 + normal(0, 0.02)), which compress like trained ones.
**Physical limit** = the imports a converter cannot avoid + the checkpoint's bytes at the output
filesystem's synced write speed (`dd ... conv=fdatasync`), both measured in the same run. Ratios are
within one run; absolute times vary with the machine's load.

**Compression.** Orbax compresses every array with zstd by default. On these 2 cores zstd is the
bottleneck of a conversion (it runs at about the disk's speed or below) and saves only ~20% on bf16
weights of this kind (their exponent bits are nearly all used), and restoring a compressed checkpoint
decompresses it again. `--compression none` is therefore the default; `--compression zstd` is there for
when disk space matters more than time (the table shows both, and the restore rates of both).

**Parity** with a checkpoint this large is streamed (nnxport/parity/streamed.py, docs/streaming.md): the
float32 reference and the NNX model are run block by block, each block read from the source's safetensors
and from the checkpoint just written when it is reached. It costs one pass over every weight per greedy
token (8) plus the logits pass, on both sides.
"""


def main(argv: list[str] | None = None) -> int:
    import datetime
    import os
    import time

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--sizes", default="1,2",
                        help="Llama-3.2-1B-shaped checkpoints: 1 (16 layers), 2 (32)")
    parser.add_argument("--big", action="store_true", help=f"also the {BIG_REPO}-shaped checkpoint (16 GB)")
    parser.add_argument("--cache", type=Path, default=base.ROOT / ".bench")
    parser.add_argument("--doc", type=Path, default=base.ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    started, t0, load0 = datetime.datetime.now().astimezone(), time.perf_counter(), os.getloadavg()[0]
    stamps: dict[str, dict[str, Any]] = {}
    for size in sorted(int(s) for s in args.sizes.split(",") if s):
        stamps[f"{size}×"] = base.make_checkpoints(args.cache, [size])[size]
    if args.big:
        folder = args.cache / "llama-3.1-8b"
        cmd = [PY, str(base.BENCH / "make_checkpoint.py"), str(folder), "--repo", BIG_REPO]
        subprocess.run(cmd, check=True)
        stamps["8B"] = {**json.loads((folder / "bench.json").read_text()), "folder": folder,
                        "command": base.show(cmd)}
    out = args.cache / "out" / "limits"
    out.parent.mkdir(parents=True, exist_ok=True)
    results, loads = {}, {}
    for name, stamp in stamps.items():
        print(f"{name}: {stamp['folder']}", file=sys.stderr, flush=True)
        argvs = cases_for(stamp["folder"], out, stamp["bytes"])
        repeat = args.repeat
        if name == "8B":  # one run each; the mesh and zstd variants are shown at 1x and 2x
            repeat = 1
            for label in ("convert --no-parity --compression zstd",
                          "convert --no-parity --mesh data=2,model=4"):
                argvs.pop(label)
        results[name] = run_timed(argvs, stamp["folder"], out, repeat)
        if name != "8B":
            loads[name] = {c: load_speed(stamp["folder"], out, c) for c in ("none", "zstd")}
    info = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "repeat": args.repeat,
            "load": (load0, os.getloadavg()[0]), "machine": base.machine(),
            "took": time.perf_counter() - t0}
    text, targets = section(stamps, results, loads, info)
    if str(args.doc) != "-":
        generate.splice(args.doc, text, MARK)
    print("\n".join(targets))
    return 0 if all(e["rc"] == 0 for r in results.values() for e in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
