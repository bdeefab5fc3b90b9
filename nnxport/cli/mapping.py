"""nnxport mapping draft."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from nnxport.cli.common import EXIT_ERROR, err, errors_handled, literal, setup_logging

app = typer.Typer(name="mapping", help="Work with mapping files.\n\nExample: nnxport mapping draft "
                                       "microsoft/resnet-50 > resnet.yaml", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


@app.command()
def draft(
    source: Annotated[str, typer.Argument(help="Hub id (org/name), local folder, or .safetensors file.")],
    model: Annotated[str | None, typer.Option(
        "--model", help="Model family name, or package.module:Class for your own NNX model "
                        "\\[default: the family config.json's model_type picks].")] = None,
    config: Annotated[Path | None, typer.Option(help="Config file, JSON or YAML (for a bare .safetensors "
                                                     "file or a custom model).")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")] = False,
) -> None:
    """Print a mapping suggestion (YAML) for SOURCE and a model on stdout.

    Source keys are matched to the model's leaves by normalised names, layer indices and shapes, with the
    transposes torch -> NNX kernels need; what could not be placed is listed in YAML comments and on
    stderr. Exit 0 when the draft covers every key and leaf, 1 when it is incomplete (still printed).

    Example: nnxport mapping draft microsoft/resnet-50 > resnet.yaml
    """
    setup_logging(quiet, True)
    with errors_handled():
        from nnxport import api

        result = api.draft(source, model, config=config, revision=revision)
        sys.stdout.write(result.text)
        sys.stdout.flush()
        summary = (f"draft: {result.placed} source keys placed, {len(result.ignored)} ignored, "
                   f"{len(result.unplaced)} not placed; {len(result.unfilled)} model leaves not filled")
        for note in result.notes:
            err.print(literal(f"note: {note}"), soft_wrap=True, highlight=False)
        for problem in result.problems:
            err.print(literal("problem: ", "red") + literal(problem), soft_wrap=True, highlight=False)
        left = [f"not placed: {k}" for k in result.unplaced] + [f"not filled: {t}" for t in result.unfilled]
        for line in left[:20]:
            err.print(literal(line), soft_wrap=True, highlight=False)
        if len(left) > 20:
            err.print(f"... and {len(left) - 20} more (listed in the YAML)", highlight=False)
        if not result.complete:
            err.print(f"[bold red]incomplete[/] {summary} (marked NOT PLACED / NOT FILLED in the YAML)",
                      soft_wrap=True, highlight=False)
            raise typer.Exit(EXIT_ERROR)
        if not quiet:
            err.print(summary, soft_wrap=True, highlight=False)
