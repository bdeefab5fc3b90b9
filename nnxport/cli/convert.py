"""nnxport convert."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nnxport.cli.common import (
    EXIT_PARITY,
    Format,
    check_stdin_mapping,
    err,
    errors_handled,
    literal,
    out,
    print_json,
    setup_logging,
)
from nnxport.cli.progress import reporter
from nnxport.cli.report import failure_line, parity_table


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    tpu = "tpu"


class DType(StrEnum):
    keep = "keep"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def _check_mesh(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("empty; expected AXIS=N[,AXIS=N...] with N >= 1, e.g. data=2")
    return value


def _check_processes(ctx: typer.Context, param: typer.CallbackParam, value: int | None) -> int | None:
    """--process-id must be below --num-processes, whichever of the two comes first."""
    given = {**ctx.params, param.name or "": value}
    index, count = given.get("process_id"), given.get("num_processes")
    if index is not None and count is not None and index >= count:
        raise typer.BadParameter(f"--process-id {index} is not in 0..{count - 1} for --num-processes {count}")
    return value


def convert(
    source: Annotated[str, typer.Argument(help="Hub id (org/name), local folder, or .safetensors file.")],
    out_dir: Annotated[Path | None,
                       typer.Option("--out", "-o", help="Output folder \\[default: ./<name>-nnx].")] = None,
    mapping: Annotated[str | None, typer.Option("--mapping", "-m",
                                                help="Built-in mapping name, YAML path, or - for stdin "
                                                     "\\[default: picked from config.json].")] = None,
    config: Annotated[Path | None, typer.Option(help="config.json to use (for a bare .safetensors file); "
                                                     "JSON or YAML.")]
    = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="Model family, or package.module:Class for your own NNX model (overrides the "
                        "mapping's 'model').")] = None,
    revision: Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.")] = None,
    device: Annotated[Device, typer.Option(help="Where the arrays go.")] = Device.auto,
    dtype: Annotated[DType, typer.Option(help="Cast floating-point weights (integers never change).")]
    = DType.keep,
    mesh: Annotated[str | None, typer.Option(
        callback=_check_mesh, help="Device mesh AXIS=N[,AXIS=N...]; arrays are sharded as "
                                                  "the mapping's 'shard' entries say, replicated elsewhere.")]
    = None,
    no_parity: Annotated[bool, typer.Option("--no-parity", help="Skip the parity check.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="Accept pickle weights (pytorch_model.bin) where there are no safetensors; "
                               "loaded with torch.load(weights_only=True).")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Convert NaN / Inf weights as they are instead of refusing them.")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="human, or one JSON document on stdout.")]
    = Format.human,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    coordinator: Annotated[str | None, typer.Option(
        help="Multi-host: HOST:PORT of process 0's coordinator (or JAX_COORDINATOR_ADDRESS).",
        rich_help_panel="Multi-host")] = None,
    num_processes: Annotated[int | None, typer.Option(
        min=1, callback=_check_processes, help="Multi-host: number of processes (or JAX_NUM_PROCESSES).",
        rich_help_panel="Multi-host")] = None,
    process_id: Annotated[int | None, typer.Option(
        min=0, callback=_check_processes,
        help="Multi-host: this process's index, 0 to N-1 (or JAX_PROCESS_ID).",
        rich_help_panel="Multi-host")] = None,
) -> None:
    """Convert a checkpoint to an Orbax checkpoint of the NNX model, with a parity report.

    Example: nnxport convert microsoft/resnet-50 --out resnet-50-nnx
    """
    setup_logging(quiet, fmt is Format.json)
    check_stdin_mapping(mapping)
    with errors_handled():
        from nnxport import api

        with reporter(quiet, fmt is Format.json) as progress:
            result = api.convert(source, out_dir, mapping=mapping, config=config, revision=revision,
                                 device=device.value, dtype=dtype.value, mesh=mesh, parity=not no_parity,
                                 force=force, allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                                 model=model, coordinator=coordinator, num_processes=num_processes,
                                 process_id=process_id, progress=progress)
        if fmt is Format.json:
            print_json(result.to_json())
        elif not quiet:
            m = result.manifest
            out.print(literal(f"{m['source']['spec']} -> {result.out}  ({m['tensors']} tensors, "
                              f"{m['bytes'] / 1e6:.1f} MB, {m['model']['family']} via mapping "
                              f"{m['mapping']['name']})"))
            if result.parity is not None:
                out.print(parity_table(result.parity))
        if result.parity is not None and not result.parity.passed:
            err.print(literal(failure_line(result.parity, result.out / "parity.md"), "red"), soft_wrap=True)
            raise typer.Exit(EXIT_PARITY)
