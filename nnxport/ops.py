"""Tensor transform ops of mapping rules: argument parsing, config references, shape inference, numpy apply.

Pure: numpy only. An op is a small frozen dataclass deriving from :class:`Op`, registered in :data:`OPS`
under its YAML name with :func:`register`; adding an op is adding one class. Ops written in a mapping may
refer to config.json values (see :class:`Expr`); :meth:`Op.resolve` substitutes them and returns a
concrete op, the only kind that can :meth:`~Op.infer` shapes or :meth:`~Op.apply` to arrays.

Every op here takes one tensor and gives one tensor. Ops over several source keys (split, concat/stack,
tie) are meant to join as further subclasses with their own shape rule over several inputs.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import reprlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

import numpy as np

__all__ = [
    "OPS",
    "Expr",
    "Op",
    "OpError",
    "Reshape",
    "Transpose",
    "parse_op",
    "register",
    "show_value",
]

MAX_EXPR_CHARS = 200
"""Longest config expression accepted (keeps evaluation shallow; real ones are a few words)."""

_DIM_LIMIT = 2**63


class OpError(ValueError):
    """An op's arguments are invalid, a config reference cannot be resolved, or a shape does not fit."""


_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def show_value(value: object) -> str:
    """A short, one-line, always-computable repr of a user-supplied value, for messages."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # ints too large to print in decimal
        return f"<{type(value).__name__}>"
    return text.replace("\n", "\\n").replace("\r", "\\r")


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(shape))


# ------------------------------------------------------------------------------------- config expressions

_BINOPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
}
_UNARY: dict[type[ast.unaryop], Callable[[int], int]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_ALLOWED_NODES = (ast.BinOp, ast.UnaryOp, ast.Name, ast.Constant, ast.Load, *_BINOPS, *_UNARY)


@dataclass(frozen=True)
class Expr:
    """An integer expression over config.json keys: names, int literals, ``+ - * //`` and parentheses.

    Parsed with :mod:`ast` and checked node by node; never passed to ``eval``.
    """

    text: str
    tree: ast.expr = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> Expr:
        """Parse and check ``text``; raise :class:`OpError` naming what is not allowed."""
        if len(text) > MAX_EXPR_CHARS:
            raise OpError(f"expression {show_value(text)} is longer than {MAX_EXPR_CHARS} characters")
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except (SyntaxError, ValueError) as e:
            msg = e.msg if isinstance(e, SyntaxError) else str(e)
            raise OpError(f"expression {show_value(text)} is not valid: {msg}") from None
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED_NODES) or (
                isinstance(node, ast.Constant) and (type(node.value) is not int)
            ):
                raise OpError(f"expression {show_value(text)} may only use config names, integers, "
                              f"+ - * // and parentheses (found {type(node).__name__})")
        return cls(text, tree)

    def evaluate(self, config: Mapping[str, Any] | None) -> int:
        """The value of the expression with names taken from ``config``."""
        return self._eval(self.tree, config)

    def _eval(self, node: ast.expr, config: Mapping[str, Any] | None) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if config is None:
                raise OpError(f"'{node.id}' needs a config.json value, but there is no config")
            if node.id not in config:
                raise OpError(f"config key '{node.id}' is missing")
            value = config[node.id]
            if type(value) is not int:
                raise OpError(f"config key '{node.id}' is {show_value(value)}, not an integer")
            return value
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, config))
        assert isinstance(node, ast.BinOp)  # parse() admits nothing else
        left, right = self._eval(node.left, config), self._eval(node.right, config)
        if isinstance(node.op, ast.FloorDiv) and right == 0:
            raise OpError(f"division by zero in '{self.text}'")
        return _BINOPS[type(node.op)](left, right)

    def __str__(self) -> str:
        return self.text.strip()


# ------------------------------------------------------------------------------------------------- ops

class Op(ABC):
    """One transform of a rule. Subclasses are frozen dataclasses with a class-level ``name``."""

    name: ClassVar[str]

    @classmethod
    @abstractmethod
    def from_args(cls, args: object) -> Self:
        """Build the op from its YAML arguments (the value of ``{name: args}``); raise OpError if invalid."""

    def resolve(self, config: Mapping[str, Any] | None) -> Op:
        """The concrete op with config references replaced by values (``self`` when there are none)."""
        return self

    @abstractmethod
    def infer(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the result for an input of ``shape``; raise OpError if the op cannot take it."""

    @abstractmethod
    def apply(self, arr: np.ndarray) -> np.ndarray:
        """The op on an array: a view where numpy gives one, never a dtype change."""

    @abstractmethod
    def describe(self) -> str:
        """Compact form for listings, e.g. ``transpose(2,3,1,0)``."""


OPS: dict[str, type[Op]] = {}
"""Every known op by its YAML name."""

_O = TypeVar("_O", bound=type[Op])


def register(cls: _O) -> _O:
    """Class decorator: make ``cls`` available in mappings under ``cls.name``."""
    OPS[cls.name] = cls
    return cls


def parse_op(spec: object) -> Op:
    """An op from its YAML form, a one-key mapping such as ``{transpose: [1, 0]}``."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise OpError(f"an op is a one-key mapping like {{transpose: [1, 0]}}, got {show_value(spec)}")
    ((name, args),) = spec.items()
    cls = OPS.get(name) if isinstance(name, str) else None
    if cls is None:
        close = difflib.get_close_matches(str(name), list(OPS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise OpError(f"unknown op {show_value(name)}{hint}; known ops: {', '.join(sorted(OPS))}")
    return cls.from_args(args)


def _arg_list(op: str, args: object, example: str) -> list[object]:
    if not isinstance(args, list):
        raise OpError(f"{op} takes a list, e.g. {{{op}: {example}}}, got {show_value(args)}")
    return args


@register
@dataclass(frozen=True)
class Transpose(Op):
    """Permute axes: result axis ``i`` is input axis ``perm[i]`` (``numpy.transpose``)."""

    name: ClassVar[str] = "transpose"
    perm: tuple[int, ...]

    @classmethod
    def from_args(cls, args: object) -> Self:
        perm: list[int] = []
        for p in _arg_list(cls.name, args, "[1, 0]"):
            if not isinstance(p, int) or isinstance(p, bool):
                raise OpError(f"transpose takes integers, got {show_value(p)}")
            perm.append(p)
        if sorted(perm) != list(range(len(perm))):
            raise OpError(f"transpose {show_value(args)} is not a permutation of 0..{len(perm) - 1}")
        return cls(tuple(perm))

    def infer(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) != len(self.perm):
            raise OpError(f"transpose [{','.join(map(str, self.perm))}] needs a {len(self.perm)}-d tensor, "
                          f"got shape {_shape(shape)}")
        return tuple(shape[p] for p in self.perm)

    def apply(self, arr: np.ndarray) -> np.ndarray:
        self.infer(arr.shape)
        return np.transpose(arr, self.perm)

    def describe(self) -> str:
        return f"transpose({','.join(map(str, self.perm))})"


def _check_dims(dims: Sequence[int | Expr]) -> None:
    ints = [d for d in dims if isinstance(d, int)]
    for d in ints:
        if d < -1 or d >= _DIM_LIMIT:
            raise OpError(f"reshape dims must be non-negative or -1, got {show_value(d)}")
    if ints.count(-1) > 1:
        raise OpError(f"reshape takes at most one -1, got ({', '.join(map(str, dims))})")


@register
@dataclass(frozen=True)
class Reshape(Op):
    """Reshape (``numpy.reshape``); one dim may be -1, dims may be config expressions (:class:`Expr`)."""

    name: ClassVar[str] = "reshape"
    dims: tuple[int | Expr, ...]

    @classmethod
    def from_args(cls, args: object) -> Self:
        dims: list[int | Expr] = []
        for d in _arg_list(cls.name, args, "[num_attention_heads, -1]"):
            if isinstance(d, str):
                dims.append(Expr.parse(d))
            elif type(d) is int:
                dims.append(d)
            else:
                raise OpError(f"reshape dims are integers or config expressions, got {show_value(d)}")
        _check_dims(dims)
        return cls(tuple(dims))

    def resolve(self, config: Mapping[str, Any] | None) -> Reshape:
        if all(isinstance(d, int) for d in self.dims):
            return self
        dims: list[int | Expr] = []
        for d in self.dims:
            value = d.evaluate(config) if isinstance(d, Expr) else d
            if isinstance(d, Expr) and abs(value) >= _DIM_LIMIT:
                raise OpError(f"'{d}' evaluates to a number too large for a dimension")
            dims.append(value)
        _check_dims(dims)
        return Reshape(tuple(dims))

    def _concrete(self) -> tuple[int, ...]:
        dims = tuple(d for d in self.dims if isinstance(d, int))
        if len(dims) != len(self.dims):
            raise OpError(f"{self.describe()} has unresolved config references; resolve() it first")
        return dims

    def infer(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        dims = self._concrete()
        total = math.prod(shape)
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            if known and total % known == 0:
                return tuple(total // known if d == -1 else d for d in dims)
        elif math.prod(dims) == total:
            return dims
        raise OpError(f"reshape to {_shape(dims)} cannot take {total} elements (shape {_shape(shape)})")

    def apply(self, arr: np.ndarray) -> np.ndarray:
        return arr.reshape(self.infer(arr.shape))

    def describe(self) -> str:
        return f"reshape({','.join(str(d) for d in self.dims)})"
