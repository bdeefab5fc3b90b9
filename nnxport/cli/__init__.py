"""The nnxport command line: a thin Typer layer over :mod:`nnxport.api`."""

from __future__ import annotations

from typing import Annotated

import typer

from nnxport.cli.convert import convert
from nnxport.cli.generate import generate
from nnxport.cli.inspect_keys import inspect_keys
from nnxport.cli.mapping import app as mapping_app
from nnxport.cli.models import models
from nnxport.cli.verify import verify
from nnxport.version import version

app = typer.Typer(
    name="nnxport",
    help="Port PyTorch / Hugging Face safetensors checkpoints to Flax NNX "
    "(Orbax checkpoint + parity report).",
    epilog="Example: nnxport convert microsoft/resnet-50 --out resnet-50-nnx, then "
    "nnxport verify resnet-50-nnx. Shell completion: nnxport --install-completion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"nnxport {version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print nnxport's version and exit.")] = False,
) -> None:
    pass


app.command()(convert)
app.command()(verify)
app.command("inspect-keys")(inspect_keys)
app.command()(generate)
app.command()(models)
app.add_typer(mapping_app)


def main() -> None:
    app(prog_name="nnxport")  # also under `python -m nnxport`: the name shell completion is keyed on
