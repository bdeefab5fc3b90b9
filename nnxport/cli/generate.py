"""nnxport generate."""

from __future__ import annotations

import typer

from nnxport.cli._errors import errors_handled
from nnxport.cli._options import (
    HumanFormat,
    HumanFormatOpt,
    LMFolderArg,
    MaxNewTokensOpt,
    PromptIdsOpt,
    PromptOpt,
    QuietOpt,
    SeedOpt,
    TemperatureOpt,
    TopKOpt,
    TopPOpt,
)
from nnxport.cli._options import prompt_ids as prompt_ids_of
from nnxport.cli._output import Mode, out


def generate(folder: LMFolderArg, max_new_tokens: MaxNewTokensOpt, prompt: PromptOpt = None,
             prompt_ids: PromptIdsOpt = None, temperature: TemperatureOpt = 0.0, top_k: TopKOpt = None,
             top_p: TopPOpt = None, seed: SeedOpt = 0, fmt: HumanFormatOpt = HumanFormat.human,
             quiet: QuietOpt = False) -> None:
    """Generate text with a converted causal LM (gpt2, llama, qwen2, qwen3, mistral), KV-cached and jitted.

    Stops early at the eos_token_id of the model's config.json.

    Example: nnxport generate gpt2-nnx --prompt "Hello, my dog" --max-new-tokens 20
    """
    ids = prompt_ids_of(prompt_ids)
    if (prompt is None) == (ids is None):
        raise typer.BadParameter("give exactly one of --prompt TEXT and --prompt-ids 1,2,3",
                                 param_hint="'--prompt' / '--prompt-ids'")
    out.setup(fmt, quiet)
    with errors_handled():
        import nnxport
        from nnxport.generation import folder_tokenizer, recorded_eos
        from nnxport.pipeline.manifest import read_manifest

        eos = recorded_eos(read_manifest(folder)["model"]["config"])
        tokenizer = folder_tokenizer(folder, needed=prompt is not None)
        if ids is None:
            ids = list(tokenizer(prompt)["input_ids"])
        tokens = nnxport.generate(nnxport.load(folder), [ids], max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  eos_token_id=eos)[0].tolist()
        text = None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
        if out.mode is Mode.json:
            out.json({"tokens": tokens, "prompt_tokens": len(ids), "text": text})
        out.result(text if text is not None else " ".join(map(str, tokens)))
