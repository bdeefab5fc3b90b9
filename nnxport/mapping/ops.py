"""Tensor transform ops of mapping rules: argument parsing, config references, shape inference, numpy apply.

Pure: numpy only. An op is a small frozen dataclass deriving from :class:`Op`, registered in :data:`OPS`
under its YAML name with :func:`register`; adding an op is adding one class. Ops written in a mapping may
refer to config.json values (see :class:`Expr`); :meth:`Op.resolve` substitutes them and returns a
concrete op, the only kind that can :meth:`~Op.infer` shapes or :meth:`~Op.apply` to arrays.

The engine runs a rule's ops over a *list* of tensors (:func:`apply_ops`, :func:`infer_ops`): a one-tensor
op (``kind == "map"``: transpose, reshape) is applied to each element; ``split`` (``kind == "split"``) turns
its one input into several parts; ``concat`` / ``stack`` (``kind == "gather"``) join the list into one.
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
from typing import Any, ClassVar, Literal, Self, TypeVar

import numpy as np

__all__ = [
    "OPS",
    "Concat",
    "Expr",
    "Gather",
    "Op",
    "OpError",
    "Reshape",
    "Split",
    "Stack",
    "Transpose",
    "apply_ops",
    "box_slices",
    "infer_ops",
    "parse_op",
    "pull_part",
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
    kind: ClassVar[Literal["map", "split", "gather"]] = "map"
    """``map``: one tensor -> one tensor, applied to each tensor of the list; ``split``: one -> several;
    ``gather``: the whole list -> one."""

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

    def pull(self, box: Box, in_shape: tuple[int, ...]) -> tuple[Box, Step]:
        """The part of an input of ``in_shape`` that gives ``box`` of the result, and the step that turns
        that part into it: ``step(x[part]) == self.apply(x)[box]``. The default takes the whole input;
        ops that can do better override it."""
        whole = tuple((0, n) for n in in_shape)
        return whole, lambda arr: self.apply(arr)[box_slices(box)]

    def infer_many(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The shapes of the results for a list of inputs (default: :meth:`infer` on each)."""
        return [self.infer(tuple(s)) for s in shapes]

    def apply_many(self, arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The op on a list of arrays (default: :meth:`apply` on each)."""
        return [self.apply(a) for a in arrs]


def infer_ops(ops: Sequence[Op], shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes after running ``ops`` (resolved) over tensors of ``shapes``; OpError if one cannot."""
    out = [tuple(s) for s in shapes]
    for op in ops:
        out = op.infer_many(out)
    return out


def apply_ops(ops: Sequence[Op], arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``ops`` (resolved) run over ``arrays``: views where numpy gives them, dtypes unchanged."""
    out = list(arrays)
    for op in ops:
        out = op.apply_many(out)
    return out


Box = tuple[tuple[int, int], ...]
"""A rectangular part of a tensor: ``(start, stop)`` per dimension."""
Step = Callable[[np.ndarray], np.ndarray]


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def pull_part(ops: Sequence[Op], source_shape: tuple[int, ...], position: int, box: Box
              ) -> tuple[Box, list[Step]] | None:
    """Which part of a rule's one source tensor gives ``box`` of its ``position``-th result, and the steps
    that turn the part into it: ``steps`` applied in order to ``source[part]`` equal
    ``apply_ops(ops, [source])[position][box]``. This is how a device's shard is read without the rest of
    the tensor. None for ops that join several tensors (concat, stack): they have no one source part.
    """
    if any(op.kind == "gather" for op in ops):
        return None
    stages: list[list[tuple[int, ...]]] = [[tuple(source_shape)]]
    for op in ops:
        stages.append(op.infer_many(stages[-1]))
    steps: list[Step] = []
    for k in reversed(range(len(ops))):
        op = ops[k]
        if isinstance(op, Split):  # the part sits at an offset along the split axis; no step needed
            axis = _axis(op.name, op.axis, len(stages[k][0]))
            offset = sum(shape[axis] for shape in stages[k + 1][:position])
            box = tuple((a + offset, b + offset) if d == axis else (a, b) for d, (a, b) in enumerate(box))
            position = 0
        else:
            box, step = op.pull(box, stages[k][position])
            steps.append(step)
    return box, steps[::-1]


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

    def pull(self, box: Box, in_shape: tuple[int, ...]) -> tuple[Box, Step]:
        part = [(0, 0)] * len(self.perm)
        for i, p in enumerate(self.perm):
            part[p] = box[i]
        return tuple(part), lambda arr: np.transpose(arr, self.perm)

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

    def pull(self, box: Box, in_shape: tuple[int, ...]) -> tuple[Box, Step]:
        """Exact for each group of dims that reshape merges or splits when only the group's first result
        dim is cut at a boundary of the input's first dim (heads, rows); other groups are read whole."""
        out_shape = self.infer(in_shape)
        groups = _reshape_groups(in_shape, out_shape)
        if groups is None:
            return super().pull(box, in_shape)
        part: list[tuple[int, int]] = []
        part_shape: list[int] = []
        local: list[slice] = []
        for (i0, i1), (j0, j1) in groups:
            cut, dims_in, dims_out = box[j0:j1], in_shape[i0:i1], out_shape[j0:j1]
            if dims_in and dims_out and all(c == (0, n) for c, n in zip(cut[1:], dims_out[1:], strict=True)):
                inner_out, inner_in = math.prod(dims_out[1:]), math.prod(dims_in[1:])
                start, stop = cut[0][0] * inner_out, cut[0][1] * inner_out
                if start % inner_in == 0 and stop % inner_in == 0:
                    part += [(start // inner_in, stop // inner_in), *((0, n) for n in dims_in[1:])]
                    part_shape += [cut[0][1] - cut[0][0], *dims_out[1:]]
                    local += [slice(None)] * len(dims_out)
                    continue
            part += [(0, n) for n in dims_in]
            part_shape += dims_out
            local += [slice(a, b) for a, b in cut]
        return tuple(part), lambda arr: arr.reshape(part_shape)[tuple(local)]

    def describe(self) -> str:
        return f"reshape({','.join(str(d) for d in self.dims)})"


def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]
                    ) -> list[tuple[tuple[int, int], tuple[int, int]]] | None:
    """The runs of dims of ``a`` and ``b`` with equal products (what a reshape merges or splits), as
    ``((i0, i1), (j0, j1))`` index ranges; None when a shape has a zero."""
    if 0 in a or 0 in b:
        return None
    groups = []
    i = j = 0
    while i < len(a) or j < len(b):
        i0, j0, pa, pb = i, j, 1, 1
        if i < len(a):
            pa, i = a[i], i + 1
        if j < len(b):
            pb, j = b[j], j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                pa, i = pa * a[i], i + 1
            elif pb < pa and j < len(b):
                pb, j = pb * b[j], j + 1
            else:
                return None
        groups.append(((i0, i), (j0, j)))
    return groups


# -------------------------------------------------------------------------------------- multi-tensor ops

def _int_arg(op: str, what: str, value: object) -> int:
    if type(value) is not int:
        raise OpError(f"{op} '{what}' must be an integer, got {show_value(value)}")
    if abs(value) >= _DIM_LIMIT:
        raise OpError(f"{op} '{what}' {show_value(value)} is too large")
    return value


def _args_dict(op: str, args: object, allowed: Sequence[str], required: Sequence[str], example: str
               ) -> Mapping[Any, Any]:
    if not isinstance(args, Mapping):
        raise OpError(f"{op} takes a mapping, e.g. {{{op}: {example}}}, got {show_value(args)}")
    for key in args:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise OpError(f"{op}: unknown argument {show_value(key)}{hint}; {op} takes {', '.join(allowed)}")
    for key in required:
        if key not in args:
            raise OpError(f"{op} needs '{key}', e.g. {{{op}: {example}}}")
    return args


def _axis(op: str, axis: int, rank: int) -> int:
    """``axis`` of a ``rank``-d tensor made non-negative; OpError if out of range."""
    if not -rank <= axis < rank:
        raise OpError(f"{op} axis {axis} is out of range for a {rank}-d tensor")
    return axis % rank


def _size(op: str, what: str, value: object) -> int | Expr:
    if isinstance(value, str):
        return Expr.parse(value)
    number = _int_arg(op, what, value)
    if number < 1:
        raise OpError(f"{op} '{what}' must be positive, got {number}")
    return number


def _evaluate(op: str, what: str, value: int | Expr, config: Mapping[str, Any] | None) -> int:
    if isinstance(value, int):
        return value
    number = value.evaluate(config)
    if number < 1 or number >= _DIM_LIMIT:
        raise OpError(f"{op} '{what}' {str(value)!r} evaluates to {number}, not a positive size")
    return number


@register
@dataclass(frozen=True)
class Split(Op):
    """One tensor -> several along ``axis``: ``parts`` equal parts, or parts of ``sizes`` (numpy views).

    ``parts`` and each size may be a config expression (:class:`Expr`). The rule's ``to`` list receives
    the parts in order.
    """

    name: ClassVar[str] = "split"
    kind: ClassVar[Literal["map", "split", "gather"]] = "split"
    axis: int
    parts: int | Expr | None = None
    sizes: tuple[int | Expr, ...] | None = None

    @classmethod
    def from_args(cls, args: object) -> Self:
        spec = _args_dict(cls.name, args, ("axis", "parts", "sizes"), ("axis",), "{axis: 1, parts: 3}")
        axis = _int_arg(cls.name, "axis", spec["axis"])
        if ("parts" in spec) == ("sizes" in spec):
            raise OpError("split takes exactly one of 'parts' (a count) and 'sizes' (a list), "
                          "e.g. {split: {axis: 1, parts: 3}}")
        if "parts" in spec:
            return cls(axis, parts=_size(cls.name, "parts", spec["parts"]))
        sizes = spec["sizes"]
        if not isinstance(sizes, list) or not sizes:
            raise OpError(f"split 'sizes' must be a non-empty list of sizes, got {show_value(sizes)}")
        return cls(axis, sizes=tuple(_size(cls.name, "sizes", s) for s in sizes))

    @property
    def count(self) -> int | None:
        """How many tensors the split gives, when known without a config."""
        if self.sizes is not None:
            return len(self.sizes)
        return self.parts if isinstance(self.parts, int) else None

    def resolve(self, config: Mapping[str, Any] | None) -> Split:
        if self.parts is not None:
            if isinstance(self.parts, int):
                return self
            return Split(self.axis, parts=_evaluate(self.name, "parts", self.parts, config))
        assert self.sizes is not None
        if all(isinstance(s, int) for s in self.sizes):
            return self
        return Split(self.axis, sizes=tuple(_evaluate(self.name, "sizes", s, config) for s in self.sizes))

    def _sizes(self, length: int) -> tuple[int, ...]:
        if self.parts is not None:
            if not isinstance(self.parts, int):
                raise OpError(f"{self.describe()} has unresolved config references; resolve() it first")
            if length % self.parts:
                raise OpError(f"split into {self.parts} equal parts along axis {self.axis} "
                              f"cannot divide length {length}")
            return (length // self.parts,) * self.parts
        assert self.sizes is not None
        sizes = tuple(s for s in self.sizes if isinstance(s, int))
        if len(sizes) != len(self.sizes):
            raise OpError(f"{self.describe()} has unresolved config references; resolve() it first")
        if sum(sizes) != length:
            raise OpError(f"split sizes {list(sizes)} sum to {sum(sizes)}, but axis {self.axis} "
                          f"has length {length}")
        return sizes

    def _check_one(self, n: int) -> None:
        if n != 1:
            raise OpError(f"split needs exactly one input tensor, got {n}")

    def infer_many(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        self._check_one(len(shapes))
        (shape,) = shapes
        axis = _axis(self.name, self.axis, len(shape))
        return [(*shape[:axis], size, *shape[axis + 1:]) for size in self._sizes(shape[axis])]

    def apply_many(self, arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self._check_one(len(arrs))
        (arr,) = arrs
        axis = _axis(self.name, self.axis, arr.ndim)
        bounds = np.cumsum(self._sizes(arr.shape[axis]))[:-1]
        return list(np.split(arr, bounds, axis=axis))

    def infer(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        raise OpError(f"{self.describe()} gives several tensors; use infer_many")

    def apply(self, arr: np.ndarray) -> np.ndarray:
        raise OpError(f"{self.describe()} gives several tensors; use apply_many")

    def describe(self) -> str:
        if self.parts is not None:
            return f"split(axis={self.axis},parts={self.parts})"
        return f"split(axis={self.axis},sizes={','.join(str(s) for s in self.sizes or ())})"


@dataclass(frozen=True)
class Gather(Op):
    """Base of ops that join the keys of one rule expanding to the same target(s) into one tensor.

    ``by`` is a template (``\\2``, ``\\g<name>``) expanded with each key's match to name its piece
    (default: the key itself); ``order`` lists the pieces in the order they are joined (default: natural
    order of the piece names, digit runs compared as numbers). ``order: indices`` (``indices``) asks for
    the pieces to be exactly the integers 0..N-1 for N pieces (experts, layers), in numeric order.
    Validation of ``by`` against the rule's regex and of the pieces against ``order`` is done by the
    mapping.
    """

    kind: ClassVar[Literal["map", "split", "gather"]] = "gather"
    axis: int
    by: str | None = None
    order: tuple[str, ...] | None = None
    indices: bool = False

    @classmethod
    def from_args(cls, args: object) -> Self:
        spec = _args_dict(cls.name, args, ("axis", "by", "order"), ("axis",),
                          "{axis: 1, by: '\\2', order: [query, key, value]}")
        axis = _int_arg(cls.name, "axis", spec["axis"])
        by = spec.get("by")
        if by is not None and (not isinstance(by, str) or not by):
            raise OpError(f"{cls.name} 'by' must be a template string like '\\1', got {show_value(by)}")
        order: tuple[str, ...] | None = None
        if spec.get("order") == "indices":
            return cls(axis, by, None, indices=True)
        if "order" in spec:
            raw = spec["order"]
            if not isinstance(raw, list) or not raw:
                raise OpError(f"{cls.name} 'order' must be a non-empty list of piece names (or 'indices': "
                              f"the pieces are 0..N-1), got {show_value(raw)}")
            names: list[str] = []
            for item in raw:
                if isinstance(item, bool) or not isinstance(item, str | int):
                    raise OpError(f"{cls.name} 'order' items are piece names (strings), "
                                  f"got {show_value(item)}")
                names.append(str(item))
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise OpError(f"{cls.name} 'order' lists {', '.join(map(repr, dupes))} more than once")
            order = tuple(names)
        return cls(axis, by, order)

    def infer(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        (out,) = self.infer_many([shape])
        return out

    def apply(self, arr: np.ndarray) -> np.ndarray:
        (out,) = self.apply_many([arr])
        return out

    def _args(self) -> str:
        extra = [] if self.by is None else [f"by={self.by}"]
        extra += [] if self.order is None else [f"order={','.join(self.order)}"]
        extra += ["order=indices"] if self.indices else []
        return ",".join([f"axis={self.axis}", *extra])

    def describe(self) -> str:
        return f"{self.name}({self._args()})"


def _need_some(op: str, n: int) -> None:
    if n == 0:
        raise OpError(f"{op} needs at least one tensor")


@register
@dataclass(frozen=True)
class Concat(Gather):
    """Join the tensors along an existing ``axis`` (``numpy.concatenate``)."""

    name: ClassVar[str] = "concat"

    def infer_many(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        _need_some(self.name, len(shapes))
        first = tuple(shapes[0])
        axis = _axis(self.name, self.axis, len(first))
        for shape in shapes[1:]:
            if len(shape) != len(first) or any(
                    a != b for i, (a, b) in enumerate(zip(shape, first, strict=True)) if i != axis):
                raise OpError(f"concat along axis {self.axis} needs equal shapes except on that axis, got "
                              f"{', '.join(_shape(s) for s in shapes)}")
        return [(*first[:axis], sum(s[axis] for s in shapes), *first[axis + 1:])]

    def apply_many(self, arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.infer_many([a.shape for a in arrs])
        return [np.concatenate(list(arrs), axis=self.axis)]


@register
@dataclass(frozen=True)
class Stack(Gather):
    """Join equal-shaped tensors along a new ``axis`` (``numpy.stack``)."""

    name: ClassVar[str] = "stack"

    def infer_many(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        _need_some(self.name, len(shapes))
        first = tuple(shapes[0])
        axis = _axis(self.name, self.axis, len(first) + 1)
        if any(tuple(s) != first for s in shapes[1:]):
            raise OpError(f"stack needs equal shapes, got {', '.join(_shape(s) for s in shapes)}")
        return [(*first[:axis], len(shapes), *first[axis:])]

    def apply_many(self, arrs: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.infer_many([a.shape for a in arrs])
        return [np.stack(list(arrs), axis=self.axis)]
