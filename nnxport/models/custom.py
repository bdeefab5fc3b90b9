"""Bring your own model: an NNX class named by its import path, ``package.module:Class``.

The protocol (docs/custom-models.md walks through an example)::

    class MyModel(nnx.Module):
        # required: built from the config file's dict (YAML or JSON), under nnx.eval_shape
        def __init__(self, config: dict, *, rngs: nnx.Rngs): ...
        def __call__(self, *inputs) -> jax.Array | dict[str, jax.Array]: ...

        # optional: parity
        reference = "package.module:TorchClass"     # a torch.nn.Module built as TorchClass(config) and
                                                    # loaded with the source's state dict (strict)
        @classmethod
        def parity_inputs(cls, config: dict) -> dict[str, tuple[int, ...]]: ...
                                                    # float32 inputs (standard normal), in the NNX layout,
                                                    # passed to both models in this order
        reference_layouts = {"x": (0, 3, 1, 2)}     # axis order of each input for the reference (NHWC ->
                                                    # NCHW here); inputs not listed are passed as they are
        parity_tolerance = {"atol": 1e-4, "rtol": 1e-3}   # for float32 weights (default shown)

        # optional: refuse configs the model cannot represent (raise nnxport.ConfigError naming the field)
        @classmethod
        def check_config(cls, config: dict) -> None: ...

Without ``reference`` (and ``parity_inputs``) parity is skipped with a warning. Outputs are compared by
name: a single array is called ``output``; a dict (or a torch tuple, named ``output_0``, ...) by its keys.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from nnxport.errors import ConfigError, NnxportError, option
from nnxport.models.base import Family, ParityHarness, ParityInput, Tolerance

DEFAULT_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


def is_import_path(name: str) -> bool:
    """Whether a model name is a ``package.module:Class`` import path rather than a family name."""
    return ":" in name


def import_object(spec: str, what: str) -> Any:
    """The object ``package.module:Name`` names; NnxportError in one line naming what is wrong. The current
    directory is searched after sys.path (as ``python -m`` does), so a model next to the user imports."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".")) \
            or not all(p.isidentifier() for p in attr.split(".")):
        raise NnxportError(f"{what} {spec!r}: expected an import path package.module:Class")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise NnxportError(f"{what} {spec!r}: cannot import module {module_name!r} ({e})") from None
    except Exception as e:  # the user's module raised while importing
        raise NnxportError(f"{what} {spec!r}: importing module {module_name!r} failed: "
                           f"{type(e).__name__}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise NnxportError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _named(out: Any, to_numpy: Any) -> dict[str, np.ndarray]:
    if isinstance(out, Mapping):
        return {str(k): to_numpy(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": to_numpy(v) for i, v in enumerate(out)}
    return {"output": to_numpy(out)}


class CustomParity(ParityHarness):
    """Parity for a custom model: its ``reference`` torch class, loaded with the source's state dict, on
    ``parity_inputs(config)`` standard-normal inputs (see the protocol above).

    Args:
        cls: the user's NNX class.
        name: its import path (for messages).
        reference_spec: its ``reference`` import path, or None (no parity).
    """

    distributions = ()

    def __init__(self, cls: Any, name: str, reference_spec: str | None):
        self.cls = cls
        self.name = name
        self.reference_spec = reference_spec

    def has_reference(self) -> bool:
        """Whether the class declares a reference; a declared one that cannot be imported is an error
        here, at planning time, rather than after the checkpoint is written."""
        if self.reference_spec is None:
            return False
        import_object(self.reference_spec, f"reference of model {self.name}")
        return True

    def reference_class(self, config: Mapping[str, Any], options: Mapping[str, Any]) -> str:
        return self.reference_spec or ""

    def load_reference(self, source: Any, config: Mapping[str, Any], options: Mapping[str, Any]
                       ) -> tuple[Any, str] | None:
        if self.reference_spec is None:
            return None
        import torch

        ref_cls = import_object(self.reference_spec, f"reference of model {self.name}")
        try:
            module = ref_cls(dict(config))
        except Exception as e:
            raise NnxportError(f"parity: building the reference {self.reference_spec}(config) failed: "
                               f"{type(e).__name__}: {e}") from None
        if not isinstance(module, torch.nn.Module):
            raise NnxportError(f"parity: the reference {self.reference_spec} is not a torch.nn.Module")
        state = {}
        for key in source.tensors:
            arr = np.asarray(source.read(key))
            if arr.dtype.kind == "V" or str(arr.dtype) in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
                arr = arr.astype(np.float32)
            state[key] = torch.from_numpy(np.ascontiguousarray(arr))
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            what = []
            if result.missing_keys:
                what.append(f"{len(result.missing_keys)} weight(s) missing from the source (first: "
                            f"{sorted(result.missing_keys)[0]})")
            if result.unexpected_keys:
                what.append(f"{len(result.unexpected_keys)} source key(s) it does not have (first: "
                            f"{sorted(result.unexpected_keys)[0]})")
            raise NnxportError(f"parity: the reference {self.reference_spec} does not load the source: "
                               f"{'; '.join(what)}; use {option('parity', False)} to skip parity")
        return module.float().eval(), self.reference_spec

    def parity_inputs(self, config: Mapping[str, Any], seed: int) -> list[ParityInput]:
        shapes = self.cls.parity_inputs(dict(config))
        if not isinstance(shapes, Mapping) or not shapes:
            raise NnxportError(f"model {self.name}: parity_inputs(config) must return a non-empty dict "
                               f"{{name: shape}}, got {shapes!r}")
        rng = np.random.default_rng(seed)
        out = []
        for name, shape in shapes.items():
            try:
                dims = tuple(int(d) for d in shape)
            except (TypeError, ValueError):
                raise NnxportError(f"model {self.name}: parity_inputs: input {name!r} has shape {shape!r}, "
                                   "not a tuple of ints") from None
            out.append(ParityInput(str(name), rng.standard_normal(dims, dtype=np.float32), seed))
        return out

    def run_nnx(self, model: nnx.Module, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import jax.numpy as jnp

        arrays = [jnp.asarray(i.value) for i in inputs]
        out = nnx.jit(lambda m, *xs: m(*xs))(model, *arrays)
        return _named(out, lambda v: np.asarray(v, dtype=np.float32))

    def run_reference(self, model: Any, inputs: list[ParityInput]) -> dict[str, np.ndarray]:
        import torch

        layouts = getattr(self.cls, "reference_layouts", None) or {}
        xs = []
        for i in inputs:
            value = i.value.transpose(tuple(layouts[i.name])) if i.name in layouts else i.value
            xs.append(torch.from_numpy(np.ascontiguousarray(value)))
        with torch.no_grad():
            out = model(*xs)
        return _named(out, lambda v: v.detach().float().numpy())

    def tolerance(self, dtype: str) -> Tolerance:
        if dtype in ("bfloat16", "float16"):
            return Tolerance(atol=2e-2, rtol=2e-2, atol_relative=True)
        tol = {**DEFAULT_TOLERANCE, **(getattr(self.cls, "parity_tolerance", None) or {})}
        return Tolerance(atol=float(tol["atol"]), rtol=float(tol["rtol"]))


class CustomFamily(Family):
    """A user's NNX class following the protocol above; ``name`` is its import path.

    The class is the spec's owner: :meth:`resolve` runs its optional ``check_config`` and gives the config
    as a plain dict, which :meth:`build` passes to the class; :attr:`parity` is a :class:`CustomParity`.

    Args:
        spec: the import path ``package.module:Class``.
    """

    mappings = ()

    def __init__(self, spec: str):
        cls = import_object(spec, "model")
        if not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
            raise NnxportError(f"model {spec!r}: {cls!r} is not an nnx.Module subclass")
        self.name = spec
        self.cls: Any = cls
        self.description = (cls.__doc__ or spec).strip().splitlines()[0]
        ref = getattr(cls, "reference", None)
        if ref is not None and not (isinstance(ref, str) and is_import_path(ref)):
            raise NnxportError(f"model {spec!r}: its 'reference' must be an import path "
                               f"'package.module:TorchClass', got {ref!r}")
        if ref is not None and not callable(getattr(cls, "parity_inputs", None)):
            raise NnxportError(f"model {spec!r} names a reference but has no parity_inputs(config) "
                               "classmethod giving the input shapes")
        self.parity = CustomParity(cls, spec, ref)

    def resolve(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config as the class gets it (a dict), after the class's own ``check_config``, if any."""
        check = getattr(self.cls, "check_config", None)
        if callable(check):
            try:
                check(dict(config))
            except NnxportError:
                raise
            except Exception as e:  # the user's check raised something else: still the config's fault
                raise ConfigError(f"model {self.name}: check_config refused the config: "
                                  f"{type(e).__name__}: {e}") from None
        return dict(config)

    def build(self, config: Mapping[str, Any], rngs: nnx.Rngs, options: Mapping[str, Any]) -> nnx.Module:
        try:
            model = self.cls(dict(config), rngs=rngs)
        except NnxportError:
            raise
        except Exception as e:
            raise ConfigError(f"model {self.name}: building it from the config failed: "
                              f"{type(e).__name__}: {e}") from None
        assert isinstance(model, nnx.Module)
        return model
