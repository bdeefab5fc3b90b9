"""Abstract state -> arrays on a device (or replicated over a mesh), read tensor by tensor."""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from nnxport.errors import DeviceError, NnxportError

DTYPES = ("keep", "float32", "bfloat16", "float16")
_FLOAT_NAMES = {"float64", "float32", "bfloat16", "float16"}


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype for a numpy-style name, bfloat16 / float8 included (via ml_dtypes)."""
    if hasattr(ml_dtypes, name):
        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def check_dtype(requested: str) -> None:
    """NnxportError unless ``requested`` is one of :data:`DTYPES`."""
    if requested not in DTYPES:
        raise NnxportError(f"unknown --dtype {requested!r} (choose from {', '.join(DTYPES)})")


def target_dtype(source_dtype: str, requested: str) -> str:
    """Dtype a tensor is stored in: floats follow ``requested`` (unless "keep"), others never change."""
    check_dtype(requested)
    if requested == "keep" or source_dtype not in _FLOAT_NAMES:
        return source_dtype
    return requested


def resolve_device(name: str) -> jax.Device:
    """The first device of platform ``name`` (auto = jax's default backend)."""
    if name == "auto":
        return jax.devices()[0]
    if name not in ("cpu", "gpu", "tpu"):
        raise DeviceError(f"unknown --device {name!r} (choose from auto, cpu, gpu, tpu)")
    try:
        return jax.devices(name)[0]
    except RuntimeError:
        have = sorted({d.platform for d in jax.devices()})
        raise DeviceError(f"--device {name}: no {name} device is available (jax sees: {', '.join(have)})") \
            from None


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,model=4"`` -> ``{"data": 2, "model": 4}``."""
    axes: dict[str, int] = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(\d+)\s*", part)
        if not m or int(m.group(2)) < 1:
            raise DeviceError(f"--mesh {spec!r}: expected AXIS=N[,AXIS=N...] with N >= 1, got {part!r}")
        if m.group(1) in axes:
            raise DeviceError(f"--mesh {spec!r}: axis {m.group(1)!r} given twice")
        axes[m.group(1)] = int(m.group(2))
    return axes


def build_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of the given axis sizes over the first ``prod(sizes)`` devices."""
    devs = list(devices if devices is not None else jax.devices())
    need = int(np.prod(list(axes.values())))
    if need > len(devs):
        raise DeviceError(f"--mesh {','.join(f'{k}={v}' for k, v in axes.items())} needs {need} devices, "
                          f"jax sees {len(devs)}")
    grid = np.array(devs[:need], dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes))


def default_sharding(device: jax.Device | None, mesh: Mesh | None) -> Sharding:
    """Where arrays go: one device, or replicated over every device of ``mesh``."""
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    assert device is not None
    return SingleDeviceSharding(device)


def put(array: np.ndarray, dtype: str, sharding: Sharding) -> jax.Array:
    """Cast ``array`` to ``dtype`` (no copy when it already is) and place it."""
    want = numpy_dtype(dtype)
    if array.dtype != want:
        array = array.astype(want)
    # device_put copies strided arrays itself, much faster than numpy does for ml_dtypes (bf16: ~8x).
    return jax.device_put(array, sharding)
