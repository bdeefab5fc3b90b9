"""Generation speed: tokens/s of ``nnxport.generate`` against transformers' ``generate`` (its default
dynamic KV cache), greedy, on the same random-weight model, in one process on the same machine.

Models (random weights, built from a config with transformers, saved, converted with ``nnxport convert
--no-parity``, cached under ``--cache``): a GPT-2-small-shaped one (the published gpt2 config, 124M
parameters) and a Llama-shaped one (Llama-3.2-1B's config with 8 layers, hidden 1024, 16 heads, 4 kv heads,
intermediate 4096: ~300M parameters), float32. For each model and batch size: a prompt of ``--prompt``
random tokens and ``--new`` new tokens (eos disabled, so every run generates exactly that many). Each
side runs once to warm up (nnxport's first call compiles; that time is reported separately), then
``--repeat`` timed runs; the best is reported. tokens/s = batch × new tokens / wall seconds (prefill
included); the ratio is nnxport's over transformers'.

    python bench/generate.py [--cache .bench/generate] [--new 64] [--prompt 32] [--batches 1,8]
                             [--repeat 3] [--doc docs/benchmarks.md]

With ``--doc`` the section between ``<!-- generation-bench -->`` markers of that file is replaced (added at
the end when missing); ``bench/run.py`` calls this script last.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- generation-bench -->"
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-small-shaped": ("openai-community/gpt2", {}),
    "llama-shaped (8 layers, hidden 1024)": ("meta-llama/Llama-3.2-1B", {
        "num_hidden_layers": 8, "hidden_size": 1024, "num_attention_heads": 16, "num_key_value_heads": 4,
        "head_dim": 64, "intermediate_size": 4096}),
}


def _model(cache: Path, name: str) -> tuple[Any, Any, int]:
    """(transformers model, nnxport model, vocab size) of MODELS[name], built and converted once."""
    import torch
    import transformers

    import nnxport
    from nnxport.testing.replicas import build_replica, published_config

    repo, overrides = MODELS[name]
    config = published_config(repo, **overrides)
    folder = cache / name.split(" ")[0]
    out = cache / f"{folder.name}-nnx"
    if not (out / "nnxport.json").is_file():
        build_replica(copy.deepcopy(config), folder, seed=0)
        nnxport.convert(folder, out, parity=False, force=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id, ref.generation_config.pad_token_id = None, 0
    return ref, nnxport.load(out), int(config["vocab_size"])


def _best(run: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times)


def _measure_model(cache: Path, name: str, new: int, prompt: int, batches: list[int],
                   repeat: int) -> list[dict[str, Any]]:
    import numpy as np
    import torch

    import nnxport

    ref, model, vocab = _model(cache, name)
    rows = []
    for batch in batches:
        ids = np.random.default_rng(batch).integers(0, vocab, size=(batch, prompt))
        tids = torch.from_numpy(ids)

        def theirs(tids: torch.Tensor = tids) -> Any:
            with torch.no_grad():
                return ref.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=new,
                                    do_sample=False)

        def ours(ids: np.ndarray = ids) -> Any:
            return nnxport.generate(model, ids, max_new_tokens=new)

        t = time.perf_counter()
        mine = ours()
        first = time.perf_counter() - t
        agree = float((mine[:, prompt:] == theirs().numpy()[:, prompt:]).mean())
        hf, nx = _best(theirs, repeat), _best(ours, repeat)
        rows.append({"model": name, "batch": batch, "prompt": prompt, "new": new,
                     "transformers_tok_s": batch * new / hf, "nnxport_tok_s": batch * new / nx,
                     "ratio": hf / nx, "nnxport_first_call_s": first, "greedy_agreement": agree})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def measure(cache: Path, new: int, prompt: int, batches: list[int], repeat: int) -> list[dict[str, Any]]:
    return [row for name in MODELS for row in _measure_model(cache, name, new, prompt, batches, repeat)]


def section(rows: list[dict[str, Any]], argv: list[str], took: float, load: tuple[float, float]) -> str:
    import jax
    import torch
    import transformers

    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [MARK, "", "## Generation", "",
             (__doc__ or "").split("\n\n")[0].replace("\n", " "), "",
             (__doc__ or "").split("\n\n")[1].replace("\n", " "), "",
             f"Run {when} ({took / 60:.1f} min), {os.cpu_count()} CPU cores, jax {jax.__version__} on "
             f"{jax.default_backend()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
             f"transformers {transformers.__version__}; load average (1 min) {load[0]:.2f} at the start, "
             f"{load[1]:.2f} at the end (a shared machine: torch's threads suffer more from contention "
             f"than XLA's, so compare ratios from a quiet machine before quoting them). Command: "
             f"`{' '.join(['python bench/generate.py', *argv])}`.", "",
             "| model | batch | prompt + new tokens | transformers tok/s | nnxport tok/s "
             "| nnxport / transformers | nnxport first call (compile) s | greedy agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} + {r['new']} | "
                     f"{r['transformers_tok_s']:.1f} | {r['nnxport_tok_s']:.1f} | {r['ratio']:.2f}× | "
                     f"{r['nnxport_first_call_s']:.1f} | {r['greedy_agreement']:.3f} |")
    lines += ["", "Greedy agreement: the fraction of new tokens both sides chose alike (random weights give "
              "near-uniform logits, where float rounding may flip a near tie).", "", MARK]
    return "\n".join(lines) + "\n"


def splice(doc: Path, text: str, mark: str = MARK) -> None:
    """Replace the section of ``doc`` between two ``mark`` lines with ``text`` (append it when there is
    none); bench/limits.py uses it for its own section."""
    old = doc.read_text() if doc.is_file() else ""
    if old.count(mark) >= 2:
        start, end = old.index(mark), old.rindex(mark) + len(mark)
        new = old[:start] + text.rstrip("\n") + old[end:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench" / "generate")
    parser.add_argument("--new", type=int, default=64, help="new tokens per run")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--batches", default="1,8", help="batch sizes")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side (best reported)")
    parser.add_argument("--doc", type=Path, default=None, help="markdown file whose section is replaced")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = measure(args.cache, args.new, args.prompt, [int(b) for b in args.batches.split(",")], args.repeat)
    shown = [a for i, a in enumerate(argv) if a != "--doc" and (i == 0 or argv[i - 1] != "--doc")]
    text = section(rows, shown, time.perf_counter() - t0, (load0, os.getloadavg()[0]))
    if args.doc is not None:
        splice(args.doc, text)
        print(f"wrote {args.doc}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
