"""nnxport generate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nnxport.cli.common import Format, errors_handled, literal, out, print_json, setup_logging

#: Files that make a folder loadable by transformers' AutoTokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _prompt_ids(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        ids = [int(p) for p in value.replace(" ", "").split(",") if p]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected comma-separated token ids, e.g. 1,2,3") from None
    if not ids or any(i < 0 for i in ids):
        raise typer.BadParameter(f"{value!r}: expected non-negative comma-separated token ids, e.g. 1,2,3")
    return ids


def _check_top_p(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is not in 0 < p <= 1")
    return value


def _tokenizer(folder: Path, needed: bool) -> Any:
    """transformers' AutoTokenizer of ``folder`` (offline), or None when it has none and none is needed."""
    from nnxport.errors import NnxportError, one_line

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if needed:
            raise NnxportError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) to encode --prompt; "
                               "give token ids with --prompt-ids")
        return None
    import transformers

    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise NnxportError(f"{folder}: the tokenizer does not load ({one_line(e, 200)}); give token ids "
                           "with --prompt-ids") from None


def generate(
    folder: Annotated[Path, typer.Argument(help="An output folder of nnxport convert (a causal LM).")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="How many tokens to generate at most.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt text, encoded with the tokenizer in FOLDER.")]
    = None,
    prompt_ids: Annotated[str | None, typer.Option("--prompt-ids", help="Prompt token ids, e.g. 1,2,3.")]
    = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; otherwise sample.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(callback=_check_top_p,
                                                help="Sample from the smallest set of tokens whose "
                                                     "probability reaches p, 0 < p <= 1.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    fmt: Annotated[Format, typer.Option("--format", help="human, or one JSON document on stdout.")]
    = Format.human,
) -> None:
    """Generate text with a converted causal LM (gpt2, llama, qwen2, qwen3, mistral), KV-cached and jitted.

    Stops early at the eos_token_id of the model's config.json.

    Example: nnxport generate gpt2-nnx --prompt "Hello, my dog" --max-new-tokens 20
    """
    ids = _prompt_ids(prompt_ids)
    if (prompt is None) == (ids is None):
        raise typer.BadParameter("give exactly one of --prompt TEXT and --prompt-ids 1,2,3",
                                 param_hint="'--prompt' / '--prompt-ids'")
    setup_logging(False, fmt is Format.json)
    with errors_handled():
        import nnxport
        from nnxport.pipeline.manifest import read_manifest

        eos = read_manifest(folder)["model"]["config"].get("eos_token_id")
        valid = isinstance(eos, int) or (isinstance(eos, list) and all(isinstance(e, int) for e in eos))
        tokenizer = _tokenizer(folder, needed=prompt is not None)
        if ids is None:
            ids = list(tokenizer(prompt)["input_ids"])
        model = nnxport.load(folder)
        tokens = nnxport.generate(model, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed,
                                  eos_token_id=eos if valid else None)[0].tolist()
        text = None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
        if fmt is Format.json:
            print_json({"tokens": tokens, "prompt_tokens": len(ids), "text": text})
        elif text is not None:
            out.print(literal(text))
        else:
            out.print(" ".join(map(str, tokens)))
