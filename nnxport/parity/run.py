"""Run the transformers reference and the NNX model on the same seeded inputs and compare."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nnxport.errors import NnxportError, option
from nnxport.mapping.analysis import Assignment
from nnxport.models import Family, ParityInput
from nnxport.parity import generation, layerwise
from nnxport.parity.metrics import compare
from nnxport.parity.report import ParityReport, number_text
from nnxport.parity.streamed import StreamedReference
from nnxport.pipeline.lazy import eagerly
from nnxport.quant.reference import write_dequantized
from nnxport.quant.view import QuantizedSource
from nnxport.sources.base import Source
from nnxport.sources.folder import INDEX_NAME
from nnxport.sources.pickled import PICKLE_INDEX_NAME

log = logging.getLogger("nnxport")


def load_reference(family: Family, source: Source, config: dict[str, Any],
                   options: dict[str, Any]) -> tuple[Any, str]:
    """The transformers model of ``family`` with the source's weights, in float32, in eval mode.

    The source's files are linked into a scratch folder with its config, so that folders, hub snapshots
    and single files all load through ``from_pretrained`` (which knows about prefixes and tied weights).
    """
    harness = family.parity
    own = harness.load_reference(source, config, options)
    if own is not None:  # a custom model's own torch reference
        return own
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls_name = harness.reference_class(config, options)
    cls = getattr(transformers, cls_name)
    with tempfile.TemporaryDirectory(prefix="nnxport-ref-") as tmp:
        folder = Path(tmp)
        if isinstance(source, QuantizedSource):  # dequantized by transformers' functions, written out
            write_dequantized(source, folder, config)
        else:
            _link_files(source, folder, config)
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True,
                                          local_files_only=True, **harness.reference_kwargs(config, options))
    missing = [k for k in info.get("missing_keys", []) if k]
    if missing:
        raise NnxportError(f"parity: the reference {cls_name} did not find {len(missing)} of its weights in "
                           f"the source (first: {sorted(missing)[0]}); "
                           f"use {option('parity', False)} to skip parity")
    return model.eval(), f"transformers.{cls_name}"


def _link_files(source: Source, folder: Path, config: dict[str, Any]) -> None:
    """The source's files linked into ``folder`` under the names from_pretrained looks for, and config."""
    for f in source.files:
        name = f.name
        if source.kind == "file":
            name = "model.safetensors" if name.endswith(".safetensors") else "pytorch_model.bin"
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f.path.absolute(), dst)
    index = source.root / (INDEX_NAME if source.files[0].name.endswith(".safetensors")
                           else PICKLE_INDEX_NAME)
    if source.kind != "file" and index.is_file():
        os.symlink(index.absolute(), folder / index.name)
    (folder / "config.json").write_text(json.dumps(config))


def run_parity(
    family: Family,
    model: nnx.Module,
    source: Source,
    config: dict[str, Any],
    dtype: str,
    *,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    assignments: Sequence[Assignment] | None = None,
    streamed: StreamedReference | None = None,
) -> ParityReport:
    """Compare ``model`` with the reference built from ``source``; ``passed`` is computed.

    With the mapping's ``assignments`` the outputs of the modules they pair are captured on both sides in
    the same forward passes and compared too (``layers``; see nnxport.parity.layerwise). They do not change
    ``passed``, which is about the model's outputs. A causal LM's harness (``generation_tokens``) also
    compares greedy generation (``generation``; nnxport.parity.generation), which ``passed`` counts.

    ``streamed`` (:func:`nnxport.parity.streamed.plan_reference`): the reference runs block by block, and
    ``model`` (typically restored lazily, :func:`nnxport.pipeline.output.restore_lazily`) runs with jit
    disabled, so that neither side is ever held whole.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if streamed is not None:
        reference, ref_name = streamed.model, streamed.name
    else:
        reference, ref_name = load_reference(family, source, config, options or {})
    timings["load_reference"] = time.perf_counter() - t
    harness = family.parity
    inputs: list[ParityInput] = harness.parity_inputs(config, seed)
    names = layerwise.reference_names(reference, (k for a in assignments or () for k in a.sources))
    groups = layerwise.layer_groups(assignments or (), names)
    prompt = _generation_prompt(harness.generation_tokens, model, inputs)
    with streamed or contextlib.nullcontext():  # a streamed reference lets go of every block on exit
        expected, ref_layers, reference_tokens = _run_reference(harness, reference, inputs, groups, prompt,
                                                                streamed, timings)
    del reference
    return _compare(family, model, ref_name, inputs, groups, prompt, dtype, expected, ref_layers,
                    reference_tokens, streamed is not None, timings)


def _run_reference(harness: Any, reference: Any, inputs: list[ParityInput], groups: list[Any],
                   prompt: tuple[np.ndarray, np.ndarray, int] | None, streamed: StreamedReference | None,
                   timings: dict[str, float]) -> tuple[dict[str, np.ndarray], dict[str, Any], Any]:
    """The reference's outputs, its per-layer captures and its greedy tokens (None without a prompt)."""
    t = time.perf_counter()
    with layerwise.torch_outputs(reference, (s for g in groups for s in g.sources)) as ref_layers:
        expected = harness.run_reference(reference, inputs)
    timings["run_reference"] = time.perf_counter() - t
    tokens = None
    if prompt is not None:
        t = time.perf_counter()
        tokens = (generation.reference_generate(reference, *prompt) if streamed is None
                  else streamed.generate(*prompt))
        timings["generate_reference"] = time.perf_counter() - t
    return expected, ref_layers, tokens


def _compare(family: Family, model: nnx.Module, ref_name: str, inputs: list[ParityInput], groups: list[Any],
             prompt: tuple[np.ndarray, np.ndarray, int] | None, dtype: str, expected: dict[str, np.ndarray],
             ref_layers: dict[str, Any], reference_tokens: Any, eager: bool, timings: dict[str, float]
             ) -> ParityReport:
    """The NNX side of :func:`run_parity` and the comparisons, once the reference has run."""
    run: Callable[[Callable[[], Any]], Any] = eagerly if eager else (lambda f: f())
    harness = family.parity
    t = time.perf_counter()
    if groups:
        got, nnx_layers = run(lambda: layerwise.nnx_outputs(harness.run_nnx, model, inputs))
    else:
        got, nnx_layers = run(lambda: harness.run_nnx(model, inputs)), {}
    timings["run_nnx"] = time.perf_counter() - t
    tol = harness.tolerance(dtype)
    check = None
    if prompt is not None and reference_tokens is not None:
        t = time.perf_counter()
        check = generation.compare_generation(run(lambda: generation.nnx_generate(model, *prompt)),
                                              reference_tokens,
                                              list(prompt[0].shape), tol)
        timings["generate_nnx"] = time.perf_counter() - t
    outputs = [compare(name, got[name], expected[name], tol, distribution=name in harness.distributions)
               for name in expected]
    t = time.perf_counter()
    mask = next((np.asarray(i.value).astype(bool) for i in inputs if i.name == "attention_mask"), None)
    layers, skipped = layerwise.compare_layers(groups, ref_layers, nnx_layers, threshold=tol.rtol,
                                               channels_first=harness.channels_first_reference, mask=mask)
    del ref_layers, nnx_layers
    jump = layerwise.first_jump([d.max_rel_diff for d in layers], tol.rtol)
    if groups:
        timings["compare_layers"] = time.perf_counter() - t
    if jump is not None:
        log.info("parity: first layer whose error jumps: %s (NNX %s), max rel diff %s", layers[jump].name,
                 layers[jump].target, number_text(layers[jump].max_rel_diff))
    return ParityReport(
        passed=all(o.passed for o in outputs) and (check is None or check.passed),
        reference=ref_name,
        inputs=[i.describe() for i in inputs],
        tolerance=tol.describe(),
        outputs=outputs,
        dtype=dtype,
        timings_s={k: round(v, 3) for k, v in timings.items()},
        layers=layers,
        layers_skipped=skipped,
        layer_threshold=tol.rtol,
        first_jump=jump,
        generation=check,
    )


def weakest_dtype(dtypes: set[str]) -> str:
    """The least precise float dtype among stored tensors (what parity tolerances depend on)."""
    for name in ("float16", "bfloat16", "float32", "float64"):
        if name in dtypes:
            return name
    return "float32"


def _generation_prompt(new_tokens: int, model: nnx.Module, inputs: list[ParityInput]
                       ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """The left-padded prompt and token count of the generation check, or None without one (not a causal
    LM, or no room left in the model's position table)."""
    by_name = {i.name: np.asarray(i.value) for i in inputs}
    if not new_tokens or "input_ids" not in by_name:
        return None
    ids = by_name["input_ids"]
    ids, mask = generation.left_padded(ids, by_name.get("attention_mask", np.ones_like(ids)))
    limit = getattr(model, "max_positions", None)
    if limit is not None:
        new_tokens = min(new_tokens, int(limit) - ids.shape[1])
    return (ids, mask, new_tokens) if new_tokens > 0 else None
