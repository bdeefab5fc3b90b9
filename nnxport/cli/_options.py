"""Every argument and option of the command line, declared once and reused by the commands (the
huggingface_hub CLI way), the ``--format`` choices, the checks of option values, and :data:`FLAGS`: how
the core's parameters (:func:`nnxport.errors.option`) are spelled on the command line.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from nnxport.errors import Option, spell

# ----------------------------------------------------------------------------------------- flag spelling

#: The flag of each API parameter a core message may name (``option("allow_pickle", True)``).
FLAGS = {
    "allow_nonfinite": "--allow-nonfinite", "allow_pickle": "--allow-pickle", "compression": "--compression",
    "config": "--config", "coordinator": "--coordinator", "device": "--device", "dtype": "--dtype",
    "force": "--force",
    "mapping": "--mapping", "mesh": "--mesh", "model": "--model", "num_processes": "--num-processes",
    "process_id": "--process-id", "prompt_ids": "--prompt-ids", "revision": "--revision",
    "source": "--source",
}
#: Parameters whose ``False`` is a flag of its own.
NEGATED = {"parity": "--no-parity"}


def flag(opt: Option) -> str:
    """``opt`` as the command line spells it: ``--allow-pickle`` (for ``allow_pickle=True``),
    ``--no-parity`` (``parity=False``), ``--dtype float32``, ``--dtype``."""
    if opt.given and opt.value is False:
        return NEGATED.get(opt.name) or f"--no-{opt.name.replace('_', '-')}"
    name = FLAGS.get(opt.name) or f"--{opt.name.replace('_', '-')}"
    return name if not opt.given or opt.value is True else f"{name} {opt.value}"


def cli_text(text: str) -> str:
    """A core message's text with its parameters spelled as flags."""
    return spell(text, flag)


# ------------------------------------------------------------------------------------------------ values

class Format(StrEnum):
    """The ``--format`` choices; each command offers its own (below), each choice an output mode
    (:class:`nnxport.cli._output.Mode`): ``human`` and ``table`` are the same one."""


class HumanFormat(Format):
    human = "human"
    json = "json"


class TableFormat(Format):
    table = "table"
    json = "json"


class KeysFormat(Format):
    table = "table"
    json = "json"
    tsv = "tsv"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"
    tpu = "tpu"


class Compression(StrEnum):
    none = "none"
    zstd = "zstd"


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


def check_stdin_mapping(mapping: str | None) -> None:
    """``--mapping -`` with stdin a terminal would wait for input that is not coming: a usage error.

    Call it before :func:`nnxport.cli._errors.errors_handled` (which would turn the usage error into an
    internal one)."""
    if mapping != "-":
        return
    if sys.stdin is None or sys.stdin.closed:
        raise typer.BadParameter("'-' reads the mapping from stdin, which is closed",
                                 param_hint="'--mapping'")
    if sys.stdin.isatty():
        raise typer.BadParameter("'-' reads the mapping from stdin, which is a terminal: pipe the YAML in, "
                                 "e.g. `cat my.yaml | nnxport ... --mapping -`", param_hint="'--mapping'")


# --------------------------------------------------------------------------------- shared by the commands

SourceArg = Annotated[str, typer.Argument(help="Hub id (org/name), local folder, or .safetensors file.")]
MappingOpt = Annotated[str | None, typer.Option(
    "--mapping", "-m", help="Built-in mapping name, YAML path, or - for stdin "
                            "\\[default: picked from config.json if one matches].")]
ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", help="config.json to use (for a bare .safetensors file or a custom model); JSON or YAML.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub revision: branch, tag or commit.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Model family name, or package.module:Class for your own NNX model \\[default: the "
                    "mapping's 'model', or the family config.json's model_type picks].")]
AllowPickleOpt = Annotated[bool, typer.Option(
    "--allow-pickle", help="Accept pickle weights (pytorch_model.bin) where there are no safetensors; "
                           "loaded with torch.load(weights_only=True).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and the JSON or "
                                                              "YAML result on stdout).")]
HumanFormatOpt = Annotated[HumanFormat, typer.Option("--format", help="human, or one JSON document on "
                                                                       "stdout.")]
TableFormatOpt = Annotated[TableFormat, typer.Option("--format", help="table or json.")]
KeysFormatOpt = Annotated[KeysFormat, typer.Option(
    "--format", help="table, json, or tsv (a header line, then one key per line).")]

# ------------------------------------------------------------------------------------------------ convert

OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output folder \\[default: ./<name>-nnx].")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where the arrays go.")]
DTypeOpt = Annotated[DType, typer.Option("--dtype", help="Cast floating-point weights (integers never "
                                                          "change).")]
CompressionOpt = Annotated[Compression, typer.Option(
    "--compression", help="Compress the checkpoint's arrays: none (the fastest to write and to load) or "
                          "zstd (smaller, bound by the CPU; docs/benchmarks.md).")]
MeshOpt = Annotated[str | None, typer.Option(
    "--mesh", callback=_check_mesh, help="Device mesh AXIS=N[,AXIS=N...]; arrays are sharded as the "
                                         "mapping's 'shard' entries say, replicated elsewhere.")]
NoParityOpt = Annotated[bool, typer.Option("--no-parity", help="Skip the parity check.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a non-empty output folder.")]
AllowNonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", help="Convert NaN / Inf weights as they are instead of refusing them.")]
CoordinatorOpt = Annotated[str | None, typer.Option(
    "--coordinator", help="Multi-host: HOST:PORT of process 0's coordinator (or JAX_COORDINATOR_ADDRESS).",
    rich_help_panel="Multi-host")]
NumProcessesOpt = Annotated[int | None, typer.Option(
    "--num-processes", min=1, callback=_check_processes,
    help="Multi-host: number of processes (or JAX_NUM_PROCESSES).", rich_help_panel="Multi-host")]
ProcessIdOpt = Annotated[int | None, typer.Option(
    "--process-id", min=0, callback=_check_processes,
    help="Multi-host: this process's index, 0 to N-1 (or JAX_PROCESS_ID).", rich_help_panel="Multi-host")]

# ------------------------------------------------------------------------------------------------- verify

FolderArg = Annotated[Path, typer.Argument(help="An output folder written by nnxport convert.")]
RecheckSourceOpt = Annotated[str | None, typer.Option(
    "--source", help="Re-check against this source instead of the recorded one.")]
RebuildModelOpt = Annotated[str | None, typer.Option(
    "--model", help="Rebuild with this model: needed to import the package.module:Class that nnxport.json "
                    "records (a manifest never imports code by itself).")]


# ----------------------------------------------------------------------------------------------- generate

def prompt_ids(value: str | None) -> list[int] | None:
    """``--prompt-ids 1,2,3`` as ids (a usage error otherwise)."""
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


LMFolderArg = Annotated[Path, typer.Argument(help="An output folder of nnxport convert (a causal LM).")]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="How many tokens to generate at most.")]
PromptOpt = Annotated[str | None, typer.Option(help="Prompt text, encoded with the tokenizer in FOLDER.")]
PromptIdsOpt = Annotated[str | None, typer.Option("--prompt-ids", help="Prompt token ids, e.g. 1,2,3.")]
TemperatureOpt = Annotated[float, typer.Option(min=0.0, help="0: greedy; otherwise sample.")]
TopKOpt = Annotated[int | None, typer.Option(min=1, help="Sample from the k most likely tokens.")]
TopPOpt = Annotated[float | None, typer.Option(callback=_check_top_p, help="Sample from the smallest set of "
                                                "tokens whose probability reaches p, 0 < p <= 1.")]
SeedOpt = Annotated[int, typer.Option(help="Sampling seed.")]
