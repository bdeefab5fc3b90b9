"""nnxport convert."""

from __future__ import annotations

import typer

from nnxport.cli._errors import EXIT_PARITY, errors_handled
from nnxport.cli._options import (
    AllowNonfiniteOpt,
    AllowPickleOpt,
    Compression,
    CompressionOpt,
    ConfigOpt,
    CoordinatorOpt,
    Device,
    DeviceOpt,
    DType,
    DTypeOpt,
    ForceOpt,
    HumanFormat,
    HumanFormatOpt,
    MappingOpt,
    MeshOpt,
    ModelOpt,
    NoParityOpt,
    NumProcessesOpt,
    OutOpt,
    ProcessIdOpt,
    QuietOpt,
    RevisionOpt,
    SourceArg,
    check_stdin_mapping,
)
from nnxport.cli._output import Mode, out
from nnxport.cli.report import convert_summary, failure_line, parity_table


def convert(source: SourceArg, out_dir: OutOpt = None, mapping: MappingOpt = None, config: ConfigOpt = None,
            model: ModelOpt = None, revision: RevisionOpt = None, device: DeviceOpt = Device.auto,
            dtype: DTypeOpt = DType.keep, mesh: MeshOpt = None,
            compression: CompressionOpt = Compression.none, no_parity: NoParityOpt = False,
            force: ForceOpt = False, allow_pickle: AllowPickleOpt = False,
            allow_nonfinite: AllowNonfiniteOpt = False, fmt: HumanFormatOpt = HumanFormat.human,
            quiet: QuietOpt = False, coordinator: CoordinatorOpt = None,
            num_processes: NumProcessesOpt = None, process_id: ProcessIdOpt = None) -> None:
    """Convert a checkpoint to an Orbax checkpoint of the NNX model, with a parity report.

    Example: nnxport convert microsoft/resnet-50 --out resnet-50-nnx
    """
    out.setup(fmt, quiet)
    check_stdin_mapping(mapping)
    with errors_handled():
        from nnxport import api

        with out.progress() as progress:
            result = api.convert(source, out_dir, mapping=mapping, config=config, revision=revision,
                                 device=device.value, dtype=dtype.value, mesh=mesh,
                                 compression=compression.value, parity=not no_parity, force=force,
                                 allow_pickle=allow_pickle, allow_nonfinite=allow_nonfinite,
                                 model=model, coordinator=coordinator, num_processes=num_processes,
                                 process_id=process_id, progress=progress)
        if out.mode is Mode.json:
            out.json(result.to_json())
        out.result(convert_summary(result), *([] if result.parity is None else [parity_table(result.parity)]))
        if result.parity is not None and not result.parity.passed:
            out.say(failure_line(result.parity, result.out / "parity.md"), style="red")
            raise typer.Exit(EXIT_PARITY)
