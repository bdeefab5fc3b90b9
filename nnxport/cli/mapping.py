"""nnxport mapping draft."""

from __future__ import annotations

import typer
from rich.text import Text

from nnxport.cli._errors import EXIT_ERROR, errors_handled
from nnxport.cli._options import ConfigOpt, ModelOpt, QuietOpt, RevisionOpt, SourceArg
from nnxport.cli._output import Mode, literal, out
from nnxport.cli.report import draft_left, draft_summary

app = typer.Typer(name="mapping", help="Work with mapping files.\n\nExample: nnxport mapping draft "
                                       "microsoft/resnet-50 > resnet.yaml", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


@app.command()
def draft(source: SourceArg, model: ModelOpt = None, config: ConfigOpt = None, revision: RevisionOpt = None,
          quiet: QuietOpt = False) -> None:
    """Print a mapping suggestion (YAML) for SOURCE and a model on stdout.

    Source keys are matched to the model's leaves by normalised names, layer indices and shapes, with the
    transposes torch -> NNX kernels need; what could not be placed is listed in YAML comments and on
    stderr. Exit 0 when the draft covers every key and leaf, 1 when it is incomplete (still printed).

    Example: nnxport mapping draft microsoft/resnet-50 > resnet.yaml
    """
    out.setup(Mode.yaml, quiet)
    with errors_handled():
        from nnxport import api

        result = api.draft(source, model, config=config, revision=revision)
        out.document(result.text)
        for note in result.notes:
            out.say(f"note: {note}")
        for problem in result.problems:
            out.say(literal("problem: ", "red"), problem)
        for line in draft_left(result):
            out.say(line)
        if not result.complete:
            out.say(Text("incomplete", "bold red"),
                    f" {draft_summary(result)} (marked NOT PLACED / NOT FILLED in the YAML)")
            raise typer.Exit(EXIT_ERROR)
        if not quiet:
            out.say(draft_summary(result))
