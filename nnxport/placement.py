"""Abstract state -> arrays on a device, or sharded over a mesh with each device's part read on its own."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from nnxport.errors import DeviceError, NnxportError, Option, ValueCheckError, option
from nnxport.mapping.ops import Box
from nnxport.sources.safetensors import numpy_dtype

log = logging.getLogger("nnxport")
DTYPES = ("keep", "float32", "bfloat16", "float16")
_FLOAT_NAMES = {"float64", "float32", "bfloat16", "float16"}


def check_dtype(requested: str) -> None:
    """NnxportError unless ``requested`` is one of :data:`DTYPES`."""
    if requested not in DTYPES:
        raise NnxportError(f"unknown {option('dtype')} {requested!r} (choose from {', '.join(DTYPES)})")


def dtype_kind(name: str) -> str:
    """``float``, ``int``, ``bool`` or ``complex`` for a numpy-style dtype name (float8 and bfloat16 are
    floats, unsigned integers are ints)."""
    if name in _FLOAT_NAMES or name.startswith(("float8", "float4", "float6")):
        return "float"
    if name == "bool":
        return "bool"
    if name.startswith("complex"):
        return "complex"
    return "int"


def target_dtype(source_dtype: str, requested: str, leaf: str | None = None, what: str = "") -> str:
    """Dtype a tensor is stored in: floats follow ``requested`` (unless "keep"), integers, booleans and
    complex numbers never change, except that 64-bit integers are stored as ``leaf`` (the model's 32-bit
    dtype: jax has no 64-bit arrays unless x64 is on), their values checked by :func:`cast_checked`.

    A tensor that cannot be stored exactly as asked is a :class:`ValueCheckError` naming ``what``: a
    kind other than the model's ``leaf`` (bool or complex into a float parameter, say), float64 or float8
    under "keep" (jax would store float32 / the model would compute in float8)."""
    check_dtype(requested)
    kind = dtype_kind(source_dtype)
    if leaf is not None and dtype_kind(leaf) != kind:
        raise ValueCheckError(f"{what}: is {source_dtype} but the model's parameter is {leaf} (nnxport "
                              f"never turns {kind} values into {dtype_kind(leaf)} ones)")
    if kind == "int":
        if numpy_dtype(source_dtype).itemsize == 8 and not jax.config.read("jax_enable_x64"):
            return leaf if leaf is not None else source_dtype.replace("64", "32")
        return source_dtype
    if kind != "float" or requested != "keep":
        return requested if kind == "float" else source_dtype
    if source_dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise ValueCheckError(f"{what}: float64, which jax would store as float32 under "
                              f"{option('dtype', 'keep')}; pass {option('dtype', 'float32')} to convert it "
                              "to float32")
    if source_dtype not in _FLOAT_NAMES:
        raise ValueCheckError(f"{what}: {source_dtype} (a quantized checkpoint?): it needs a dequantize op "
                              f"with its scales, or {option('dtype')} float32 / bfloat16 / float16 to "
                              "convert the stored values as they are")
    return source_dtype


def resolve_device(name: str) -> jax.Device:
    """The first device of platform ``name`` (auto = jax's default backend)."""
    if name == "auto":
        return jax.devices()[0]
    if name not in ("cpu", "gpu", "tpu"):
        raise DeviceError(f"unknown {option('device')} {name!r} (choose from auto, cpu, gpu, tpu)")
    try:
        return jax.devices(name)[0]
    except RuntimeError:
        have = sorted({d.platform for d in jax.devices()})
        raise DeviceError(f"{option('device', name)}: no {name} device is available "
                          f"(jax sees: {', '.join(have)})") from None


def init_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> int:
    """Join a multi-process run (``jax.distributed``) when a coordinator is given, by flag or by
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID for the other two); the number of
    processes. Must run before anything asks jax for its devices."""
    if num_processes is not None and num_processes < 1:
        raise DeviceError(f"{option('num_processes', num_processes)}: must be at least 1")
    if process_id is not None and process_id < 0:
        raise DeviceError(f"{option('process_id', process_id)}: must be at least 0")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise DeviceError(f"{option('process_id', process_id)}: must be in 0..{num_processes - 1} for "
                          f"{num_processes} processes")
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator is None:
        if (num_processes or 1) > 1 or (process_id or 0) > 0:
            raise DeviceError(f"{option('num_processes')} / {option('process_id')} need "
                              f"{option('coordinator')} HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        return jax.process_count()
    if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", coordinator):
        raise DeviceError(f"{option('coordinator')} {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    count = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES",
                                                                    option("num_processes"))
    index = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", option("process_id"))
    if count is not None and count < 1:
        raise DeviceError(f"{option('num_processes', count)}: must be at least 1")
    if count is not None and index is not None and not 0 <= index < count:
        raise DeviceError(f"{option('process_id', index)}: must be in 0..{count - 1} for {count} processes")
    if not jax.distributed.is_initialized():
        _join(coordinator, count, index)
    return jax.process_count()


def _join(coordinator: str, count: int | None, index: int | None) -> None:
    """``jax.distributed.initialize``, bounded and interruptible: it blocks in C++ until every process has
    joined (Python's signal handlers cannot run meanwhile) and, at its own deadline, aborts the process
    with a C++ stack dump. So it runs in a thread while this one waits, raising for SIGINT / SIGTERM, and
    gives up with one line NNXPORT_COORDINATOR_TIMEOUT seconds (default 300) after starting, a little
    before jax's deadline: a command line ends then; a Python caller's process is still aborted by jax
    shortly after."""
    value = os.environ.get("NNXPORT_COORDINATOR_TIMEOUT", "").strip() or "300"
    if not value.isdigit() or int(value) < 1:
        raise DeviceError(f"NNXPORT_COORDINATOR_TIMEOUT={value!r}: expected a number of seconds, at least 1")
    timeout = int(value)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            jax.distributed.initialize(coordinator, count, index, initialization_timeout=timeout + 10)
        except (RuntimeError, ValueError) as e:
            failed.append(e)

    log.info("joining the multi-process run: waiting for coordinator %s (up to %d s)", coordinator, timeout)
    thread = threading.Thread(target=run, name="nnxport-distributed-init", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)  # a signal ends this wait (KeyboardInterrupt / Terminated)
    if thread.is_alive():
        raise DeviceError(f"{option('coordinator', coordinator)}: no multi-process run joined within "
                          f"{timeout} s (is process 0 running and reachable? NNXPORT_COORDINATOR_TIMEOUT "
                          "sets the wait)")
    if failed:
        e = failed[0]
        raise DeviceError(f"{option('coordinator', coordinator)}: cannot join the multi-process run "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _env_int(name: str, flag: Option) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    if not value.strip().isdigit():
        raise DeviceError(f"{name}={value!r}: expected a number (or pass {flag})")
    return int(value)


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``; an empty spec is an error, not "no mesh"."""
    if not spec.strip():
        raise DeviceError(f"{option('mesh')} {spec!r}: empty; expected AXIS=N[,AXIS=N...] with N >= 1, "
                          "e.g. data=2")
    axes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise DeviceError(f"{option('mesh')} {spec!r}: expected AXIS=N[,AXIS=N...] with N >= 1, "
                              f"got {part!r}")
        if m.group(1) in axes:
            raise DeviceError(f"{option('mesh')} {spec!r}: axis {m.group(1)!r} given twice")
        axes[m.group(1)] = int(m.group(2))
    return axes


def build_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of the given axis sizes over the first ``prod(sizes)`` devices."""
    devs = list(devices if devices is not None else jax.devices())
    need = int(np.prod(list(axes.values())))
    if need > len(devs):
        given = ",".join(f"{k}={v}" for k, v in axes.items())
        raise DeviceError(f"{option('mesh', given)} needs {need} devices, jax sees {len(devs)}")
    grid = np.array(devs[:need], dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes))


def partition_spec(shard: Sequence[tuple[str, ...] | None] | None, shape: tuple[int, ...], mesh: Mesh
                   ) -> tuple[PartitionSpec, list[str]]:
    """The PartitionSpec of a target of ``shape`` for a mapping's ``shard`` entry on ``mesh``, and why
    any named axis was dropped: an axis the mesh does not have, or a dimension it does not divide (that
    dimension is then replicated over it)."""
    if shard is None:
        return PartitionSpec(), []
    dims: list[str | tuple[str, ...] | None] = []
    dropped: list[str] = []
    for axes, size in zip(shard, shape, strict=True):
        kept = [a for a in axes or () if a in mesh.shape]
        dropped += [f"axis {a!r} is not in the mesh" for a in axes or () if a not in mesh.shape]
        ways = math.prod(mesh.shape[a] for a in kept)
        if kept and size % ways:
            dropped.append(f"dimension of size {size} cannot be split {ways} ways over {'x'.join(kept)}")
            kept = []
        dims.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims), dropped


def put_parts(shape: tuple[int, ...], dtype: str, sharding: Sharding,
              read: Callable[[Box], np.ndarray], *, what: str = "", allow_nonfinite: bool = False
              ) -> jax.Array:
    """An array of ``shape`` laid out by ``sharding`` whose device parts are read with ``read(box)``:
    only the parts this process's devices hold, each distinct part once (jax asks once per device when a
    target is replicated along some mesh axes); cast to ``dtype`` by :func:`cast_checked`."""
    want = numpy_dtype(dtype)
    parts: dict[Box, np.ndarray] = {}

    def part(index: tuple[slice, ...] | None) -> np.ndarray:
        box = tuple(s.indices(n)[:2] for s, n in zip(index or (), shape, strict=True))
        if box not in parts:
            parts[box] = cast_checked(read(box), want, what, allow_nonfinite)
        return parts[box]

    return jax.make_array_from_callback(shape, sharding, part)


def default_sharding(device: jax.Device | None, mesh: Mesh | None) -> Sharding:
    """Where arrays go: one device, or replicated over every device of ``mesh``."""
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    assert device is not None
    return SingleDeviceSharding(device)


def put(array: np.ndarray, dtype: str, sharding: Sharding, *, what: str = "",
        allow_nonfinite: bool = False) -> jax.Array:
    """Cast ``array`` to ``dtype`` (no copy when it already is) and place it, after :func:`cast_checked`
    (``what`` names the tensor in its errors)."""
    array = cast_checked(array, numpy_dtype(dtype), what, allow_nonfinite)
    # device_put copies strided arrays itself, much faster than numpy does for ml_dtypes (bf16: ~8x).
    return jax.device_put(array, sharding)


# Exponent bits of the IEEE-style floats: all set means Inf or NaN. Checking them on the integer view is
# ~4x faster than np.isfinite on bfloat16 (8 GB/s here), so the check costs little next to the read.
_EXPONENT: dict[np.dtype, np.generic] = {
    np.dtype(np.float16): np.uint16(0x7C00),
    np.dtype(ml_dtypes.bfloat16): np.uint16(0x7F80),
    np.dtype(np.float32): np.uint32(0x7F800000),
    np.dtype(np.float64): np.uint64(0x7FF0000000000000),
}
_CHUNK = 1 << 20


def count_nonfinite(array: np.ndarray) -> int:
    """How many NaN / Inf values ``array`` holds (0 for integer and bool arrays). Works on the integer
    view of the floats' bits in place, in blocks along the first axis: the arrays checked are often
    transposed views, and making them contiguous first would copy them (slowly, for ml_dtypes)."""
    if array.dtype.kind not in "fcV" or array.size == 0:
        return 0
    mask = _EXPONENT.get(array.dtype)
    if mask is None:  # float8 and other ml_dtypes floats, complex
        return int(np.count_nonzero(~np.isfinite(array)))
    bits = array.reshape(1, -1) if array.ndim == 0 else array
    bits = bits.view(mask.dtype)
    step = max(1, _CHUNK // max(1, bits.size // bits.shape[0]))
    n = 0
    for i in range(0, bits.shape[0], step):
        block = np.bitwise_and(bits[i:i + step], mask)
        n += int(np.count_nonzero(block == mask))
    return n


def cast_checked(array: np.ndarray, want: np.dtype, what: str, allow_nonfinite: bool) -> np.ndarray:
    """``array`` cast to ``want``, refusing NaN / Inf in it (unless ``allow_nonfinite``) and values the
    cast turns into Inf (fp32 beyond fp16's range), each a :class:`ValueCheckError` naming ``what``."""
    bad = count_nonfinite(array)
    if bad and not allow_nonfinite:
        nan = int(np.count_nonzero(np.isnan(array.astype(np.float32) if array.dtype.itemsize < 4 else array)))
        raise ValueCheckError(f"{what}: {nan} NaN and {bad - nan} Inf value(s) of {array.size} (pass "
                              f"{option('allow_nonfinite', True)} to convert them as they are)")
    if array.dtype == want:
        return array
    if want.kind in "iu" and array.dtype.kind in "iu" and array.size:
        lo, hi, limits = int(array.min()), int(array.max()), np.iinfo(want)
        if lo < limits.min or hi > limits.max:
            raise ValueCheckError(f"{what}: {array.dtype.name} values from {lo} to {hi} do not fit the "
                                  f"{want.name} it is stored as ({limits.min} to {limits.max})")
    with np.errstate(over="ignore", invalid="ignore"):
        cast = array.astype(want)
    if want.kind == "f" and count_nonfinite(cast) > bad:
        finite = array[np.isfinite(array.astype(np.float64))]
        biggest = float(np.max(np.abs(finite.astype(np.float64))))
        limit = float(ml_dtypes.finfo(want).max)
        raise ValueCheckError(f"{what}: values up to {biggest:.6g} overflow {want.name} (largest "
                              f"{limit:.6g}); keep a wider {option('dtype')} (keep, float32 or bfloat16)")
    return cast
