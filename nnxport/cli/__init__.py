"""The nnxport command line: a thin Typer layer over :mod:`nnxport.api`."""

from __future__ import annotations

import typer

from nnxport.cli.convert import convert
from nnxport.cli.inspect_keys import inspect_keys
from nnxport.cli.mapping import app as mapping_app
from nnxport.cli.models import models
from nnxport.cli.verify import verify

app = typer.Typer(
    name="nnxport",
    help="Port PyTorch / Hugging Face safetensors checkpoints to Flax NNX "
    "(Orbax checkpoint + parity report).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(convert)
app.command()(verify)
app.command("inspect-keys")(inspect_keys)
app.command()(models)
app.add_typer(mapping_app)


def main() -> None:
    app()
