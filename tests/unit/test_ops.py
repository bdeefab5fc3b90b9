"""nnxport.mapping.ops: parsing, config expressions, shape inference vs numpy, dtype preservation, errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nnxport.mapping.ops import (
    OPS,
    Concat,
    Expr,
    OpError,
    Reshape,
    Split,
    Stack,
    Transpose,
    apply_ops,
    infer_ops,
    parse_op,
    show_value,
)

CONFIG = {"num_attention_heads": 4, "hidden_size": 32, "flag": True, "ratio": 0.5, "name": "x", "zero": 0}


def test_registry_holds_every_op() -> None:
    assert dict(OPS) == {"transpose": Transpose, "reshape": Reshape, "split": Split, "concat": Concat,
                         "stack": Stack}


@pytest.mark.parametrize("perm", [[1, 0], [2, 3, 1, 0], [0], [0, 2, 1]])
def test_transpose_infer_and_apply_match_numpy(perm: list[int]) -> None:
    arr = np.arange(np.prod(range(2, 2 + len(perm))), dtype=np.float32).reshape(range(2, 2 + len(perm)))
    op = parse_op({"transpose": perm})
    out = op.apply(arr)
    np.testing.assert_array_equal(out, np.transpose(arr, perm))
    assert op.infer(arr.shape) == out.shape
    assert np.shares_memory(out, arr)  # a view: the caller makes it contiguous
    assert op.describe() == f"transpose({','.join(map(str, perm))})"


def test_transpose_rank_mismatch_message() -> None:
    op = parse_op({"transpose": [2, 3, 1, 0]})
    with pytest.raises(OpError, match=r"^transpose \[2,3,1,0\] needs a 4-d tensor, got shape \(64,\)$"):
        op.infer((64,))
    with pytest.raises(OpError, match="4-d"):
        op.apply(np.zeros((2, 3)))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([0, 0], "not a permutation"),
        ([1, 2], "not a permutation"),
        ([0, -1], "not a permutation"),
        ([True, False], "integers"),
        ([0, "1"], "integers"),
        ([0.0, 1], "integers"),
        ("1, 0", "takes a list"),
        ({"a": 1}, "takes a list"),
        (None, "takes a list"),
    ],
)
def test_transpose_bad_args(args: object, fragment: str) -> None:
    with pytest.raises(OpError, match=fragment):
        parse_op({"transpose": args})


@pytest.mark.parametrize(
    ("shape", "dims", "expected"),
    [((12,), [3, 4], (3, 4)), ((2, 3, 4), [-1], (24,)), ((2, 3, 4), [6, -1], (6, 4)), ((1,), [], ()),
     ((0, 5), [5, 0], (5, 0)), ((4, 6), [2, -1, 3], (2, 4, 3))],
)
def test_reshape_infer_and_apply_match_numpy(shape: tuple[int, ...], dims: list[int],
                                             expected: tuple[int, ...]) -> None:
    arr = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    op = parse_op({"reshape": dims})
    assert op.infer(shape) == expected
    out = op.apply(arr)
    np.testing.assert_array_equal(out, arr.reshape(dims))
    assert out.shape == expected and out.base is not None  # a view, no copy


@pytest.mark.parametrize(("shape", "dims"),
                         [((10,), [3, 4]), ((10,), [3, -1]), ((0, 4), [0, -1]), ((5,), [])])
def test_reshape_element_mismatch(shape: tuple[int, ...], dims: list[int]) -> None:
    op = parse_op({"reshape": dims})
    with pytest.raises(OpError, match=rf"reshape to \(.*\) cannot take {int(np.prod(shape))} elements"):
        op.infer(shape)
    with pytest.raises(OpError, match="cannot take"):
        op.apply(np.zeros(shape))


def test_reshape_message_matches_brief() -> None:
    with pytest.raises(OpError, match=r"^reshape to \(3, 4\) cannot take 10 elements \(shape \(10,\)\)$"):
        parse_op({"reshape": [3, 4]}).infer((10,))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([-1, -1], "at most one -1"), ([-2, 3], "non-negative or -1"), ([1.5], "integers or config"),
     ([True], "integers or config"), ([[1]], "integers or config"), (3, "takes a list"),
     ([2**70], "non-negative or -1")],
)
def test_reshape_bad_args(args: object, fragment: str) -> None:
    with pytest.raises(OpError, match=fragment):
        parse_op({"reshape": args})


def test_reshape_with_config_expressions() -> None:
    op = parse_op({"reshape": ["num_attention_heads", "hidden_size // num_attention_heads", -1]})
    assert op.describe() == "reshape(num_attention_heads,hidden_size // num_attention_heads,-1)"
    with pytest.raises(OpError, match="unresolved"):
        op.infer((32, 5))
    concrete = op.resolve(CONFIG)
    assert concrete == Reshape((4, 8, -1)) and concrete.describe() == "reshape(4,8,-1)"
    assert concrete.infer((32, 5)) == (4, 8, 5)
    arr = np.arange(160.0).reshape(32, 5)
    np.testing.assert_array_equal(concrete.apply(arr), arr.reshape(4, 8, 5))
    literal = parse_op({"reshape": [4, -1]})
    assert literal.resolve(CONFIG) is literal and literal.resolve(None) is literal


@pytest.mark.parametrize(
    ("text", "value"),
    [("hidden_size", 32), ("hidden_size // num_attention_heads", 8), ("2 * (hidden_size + 1) - 3", 63),
     ("-num_attention_heads + 5", 1), ("  7  ", 7), ("hidden_size // 3", 10), ("(((1)))", 1)],
)
def test_expression_values(text: str, value: int) -> None:
    assert Expr.parse(text).evaluate(CONFIG) == value


@pytest.mark.parametrize(
    "text",
    ["__import__('os')", "__import__('os').system('true')", "hidden_size.__class__", "hidden_size ** 2",
     "hidden_size / 2", "hidden_size % 3", "'a'", "1.5", "True", "[1]", "lambda: 1", "a if b else c",
     "hidden_size < 2", "f(1)", "x[0]", "", "1 +", "a = 1", "1\x00", "9" * 5000, "~1", "hidden_size << 1"],
)
def test_expression_rejects_anything_else(text: str) -> None:
    with pytest.raises(OpError, match="expression"):
        Expr.parse(text)


def test_reshape_rejects_malicious_expression_at_parse_time() -> None:
    with pytest.raises(OpError, match=r"found Call"):
        parse_op({"reshape": ["__import__('os').getcwd()", -1]})


@pytest.mark.parametrize(
    ("text", "config", "fragment"),
    [("num_heads", CONFIG, "config key 'num_heads' is missing"),
     ("flag * 2", CONFIG, "config key 'flag' is True, not an integer"),
     ("ratio", CONFIG, "config key 'ratio' is 0.5, not an integer"),
     ("name", CONFIG, "config key 'name' is 'x', not an integer"),
     ("hidden_size // zero", CONFIG, "division by zero in 'hidden_size // zero'"),
     ("hidden_size", None, "'hidden_size' needs a config.json value, but there is no config")],
)
def test_expression_resolution_errors(text: str, config: dict[str, object] | None, fragment: str) -> None:
    op = parse_op({"reshape": [text, -1]})
    with pytest.raises(OpError) as err:
        op.resolve(config)
    assert fragment in str(err.value)


def test_resolved_dims_are_checked_again() -> None:
    with pytest.raises(OpError, match="at most one -1"):
        parse_op({"reshape": ["zero - 1", -1]}).resolve(CONFIG)
    with pytest.raises(OpError, match="too large"):
        parse_op({"reshape": ["hidden_size * " * 13 + "1"]}).resolve(CONFIG)


def test_bfloat16_stays_bfloat16() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    arr = ref.astype(bf16)
    transposed = parse_op({"transpose": [1, 0]}).apply(arr)
    flat = parse_op({"reshape": ["hidden_size // 16 + 4"]}).resolve(CONFIG).apply(arr)
    assert transposed.dtype == bf16 and flat.dtype == bf16
    np.testing.assert_array_equal(transposed.astype(np.float32), ref.T)
    np.testing.assert_array_equal(flat.astype(np.float32), ref.ravel())


@pytest.mark.parametrize("dtype", [np.float16, np.int8, np.bool_, np.complex64])
def test_other_dtypes_kept(dtype: type) -> None:
    arr: np.ndarray = np.zeros((2, 3), dtype=dtype)
    assert parse_op({"transpose": [1, 0]}).apply(arr).dtype == arr.dtype
    assert parse_op({"reshape": [3, 2]}).apply(arr).dtype == arr.dtype


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [({"flip": [0]}, "unknown op 'flip'; known ops: concat, reshape, split, stack, transpose"),
     ({"transpos": [1, 0]}, "unknown op 'transpos' (did you mean 'transpose'?)"),
     ({"transpose": [1, 0], "reshape": [-1]}, "one-key mapping"),
     ({}, "one-key mapping"),
     ("transpose", "one-key mapping"),
     ([{"transpose": [1, 0]}], "one-key mapping"),
     ({1: [0]}, "unknown op 1")],
)
def test_parse_op_errors(spec: object, fragment: str) -> None:
    with pytest.raises(OpError) as err:
        parse_op(spec)
    assert fragment in str(err.value)


def test_show_value_is_short_and_safe() -> None:
    huge = 1 << 20000  # too many digits for repr()
    assert show_value(huge) == "<int>"
    nested: list[object] = []
    nested.append(nested)
    assert len(show_value(nested)) < 100
    assert "\n" not in show_value("a\nb") and len(show_value("x" * 10_000)) < 100


def test_ops_are_hashable_values() -> None:
    assert parse_op({"transpose": [1, 0]}) == Transpose((1, 0))
    spec = {"reshape": ["hidden_size", -1]}
    assert hash(parse_op(spec)) == hash(parse_op(spec)) and parse_op(spec) == parse_op(spec)
    assert parse_op({"reshape": ["a"]}) != parse_op({"reshape": ["b"]})


# ------------------------------------------------------------------------------------- multi-tensor ops

def test_split_parts_gives_views_in_order() -> None:
    fused = np.arange(4 * 12, dtype=np.float32).reshape(4, 12)
    op = parse_op({"split": {"axis": 1, "parts": 3}})
    assert op == Split(1, parts=3) and op.kind == "split" and op.describe() == "split(axis=1,parts=3)"
    assert op.infer_many([(4, 12)]) == [(4, 4)] * 3
    q, k, v = op.apply_many([fused])
    np.testing.assert_array_equal(q, fused[:, 0:4])
    np.testing.assert_array_equal(k, fused[:, 4:8])
    np.testing.assert_array_equal(v, fused[:, 8:12])
    assert all(np.shares_memory(part, fused) for part in (q, k, v))  # views, no copies


def test_split_sizes_negative_axis_and_config_expressions() -> None:
    arr = np.arange(2 * 10, dtype=np.int32).reshape(2, 10)
    op = parse_op({"split": {"axis": -1, "sizes": [6, 2, 2]}})
    assert op.infer_many([(2, 10)]) == [(2, 6), (2, 2), (2, 2)]
    parts = op.apply_many([arr])
    for part, expected in zip(parts, np.split(arr, [6, 8], axis=1), strict=True):
        np.testing.assert_array_equal(part, expected)
    gqa = parse_op({"split": {"axis": 0, "sizes": ["num_attention_heads * 2", "kv * 2", "kv * 2"]}})
    assert gqa.describe() == "split(axis=0,sizes=num_attention_heads * 2,kv * 2,kv * 2)"
    with pytest.raises(OpError, match="unresolved"):
        gqa.infer_many([(12, 3)])
    concrete = gqa.resolve({**CONFIG, "kv": 1})
    assert concrete == Split(0, sizes=(8, 2, 2))
    assert concrete.infer_many([(12, 3)]) == [(8, 3), (2, 3), (2, 3)]
    heads = parse_op({"split": {"axis": 0, "parts": "num_attention_heads"}}).resolve(CONFIG)
    assert heads == Split(0, parts=4) and len(heads.apply_many([np.zeros((8, 1))])) == 4
    literal = parse_op({"split": {"axis": 0, "parts": 2}})
    assert literal.resolve(None) is literal


@pytest.mark.parametrize(
    ("args", "shape", "message"),
    [({"axis": 1, "sizes": [2, 3]}, (4, 6), r"^split sizes \[2, 3\] sum to 5, but axis 1 has length 6$"),
     ({"axis": 0, "parts": 4}, (6, 2), r"^split into 4 equal parts along axis 0 cannot divide length 6$"),
     ({"axis": 2, "parts": 2}, (4, 6), r"^split axis 2 is out of range for a 2-d tensor$"),
     ({"axis": -3, "parts": 2}, (4, 6), r"^split axis -3 is out of range for a 2-d tensor$")],
)
def test_split_shape_errors(args: dict[str, object], shape: tuple[int, ...], message: str) -> None:
    op = parse_op({"split": args})
    with pytest.raises(OpError, match=message):
        op.infer_many([shape])
    with pytest.raises(OpError, match=message):
        op.apply_many([np.zeros(shape)])


def test_split_takes_exactly_one_tensor() -> None:
    op = parse_op({"split": {"axis": 0, "parts": 2}})
    with pytest.raises(OpError, match=r"^split needs exactly one input tensor, got 2$"):
        op.infer_many([(4,), (4,)])
    with pytest.raises(OpError, match="gives several tensors"):
        op.infer((4,))
    with pytest.raises(OpError, match="gives several tensors"):
        op.apply(np.zeros(4))


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([1, 3], "split takes a mapping, e.g. {split: {axis: 1, parts: 3}}"),
     ({"parts": 3}, "split needs 'axis'"),
     ({"axis": 1}, "exactly one of 'parts'"),
     ({"axis": 1, "parts": 3, "sizes": [1, 2]}, "exactly one of 'parts'"),
     ({"axis": 1, "part": 3},
      "unknown argument 'part' (did you mean 'parts'?); split takes axis, parts, sizes"),
     ({"axis": 1.0, "parts": 3}, "split 'axis' must be an integer, got 1.0"),
     ({"axis": True, "parts": 3}, "split 'axis' must be an integer, got True"),
     ({"axis": 0, "parts": 0}, "split 'parts' must be positive, got 0"),
     ({"axis": 0, "sizes": [2, -1]}, "split 'sizes' must be positive, got -1"),
     ({"axis": 0, "sizes": []}, "'sizes' must be a non-empty list"),
     ({"axis": 0, "sizes": 3}, "'sizes' must be a non-empty list"),
     ({"axis": 0, "parts": "a / 2"}, "found Div"),
     ({"axis": 2**70, "parts": 2}, "too large")],
)
def test_split_bad_args(args: object, fragment: str) -> None:
    with pytest.raises(OpError) as err:
        parse_op({"split": args})
    assert fragment in str(err.value)


def test_split_expression_must_give_a_positive_size() -> None:
    with pytest.raises(OpError, match="'zero' evaluates to 0, not a positive size"):
        parse_op({"split": {"axis": 0, "parts": "zero"}}).resolve(CONFIG)
    with pytest.raises(OpError, match="config key 'nope' is missing"):
        parse_op({"split": {"axis": 0, "sizes": [1, "nope"]}}).resolve(CONFIG)


def test_concat_and_stack_match_numpy() -> None:
    arrs = [np.full((2, 3), i, dtype=np.float32) for i in range(3)]
    concat = parse_op({"concat": {"axis": 1, "by": "\\2", "order": ["query", "key", "value"]}})
    assert concat == Concat(1, "\\2", ("query", "key", "value")) and concat.kind == "gather"
    assert concat.describe() == "concat(axis=1,by=\\2,order=query,key,value)"
    assert concat.infer_many([a.shape for a in arrs]) == [(2, 9)]
    np.testing.assert_array_equal(concat.apply_many(arrs)[0], np.concatenate(arrs, axis=1))
    assert parse_op({"concat": {"axis": -2}}).infer_many([(2, 3), (5, 3)]) == [(7, 3)]
    stack = parse_op({"stack": {"axis": 0}})
    assert stack == Stack(0) and stack.describe() == "stack(axis=0)"
    assert stack.infer_many([(2, 3)] * 3) == [(3, 2, 3)]
    np.testing.assert_array_equal(stack.apply_many(arrs)[0], np.stack(arrs))
    last = parse_op({"stack": {"axis": -1}})
    assert last.infer_many([(2, 3)] * 4) == [(2, 3, 4)]
    np.testing.assert_array_equal(last.apply_many(arrs)[0], np.stack(arrs, axis=-1))
    assert concat.infer((2, 3)) == (2, 3) and stack.infer((2, 3)) == (1, 2, 3)  # one tensor: trivial join
    np.testing.assert_array_equal(stack.apply(arrs[0]), arrs[0][None])


@pytest.mark.parametrize(
    ("spec", "shapes", "message"),
    [({"concat": {"axis": 1}}, [(2, 3), (3, 3)],
      r"^concat along axis 1 needs equal shapes except on that axis, got \(2, 3\), \(3, 3\)$"),
     ({"concat": {"axis": 0}}, [(2, 3), (2,)], "needs equal shapes except on that axis"),
     ({"concat": {"axis": 2}}, [(2, 3)], r"^concat axis 2 is out of range for a 2-d tensor$"),
     ({"stack": {"axis": 0}}, [(2, 3), (3, 2)], r"^stack needs equal shapes, got \(2, 3\), \(3, 2\)$"),
     ({"stack": {"axis": 3}}, [(2, 3)], r"^stack axis 3 is out of range for a 3-d tensor$"),
     ({"stack": {"axis": 0}}, [], r"^stack needs at least one tensor$")],
)
def test_gather_shape_errors(spec: object, shapes: list[tuple[int, ...]], message: str) -> None:
    op = parse_op(spec)
    with pytest.raises(OpError, match=message):
        op.infer_many(shapes)
    if shapes:
        with pytest.raises(OpError, match=message):
            op.apply_many([np.zeros(s) for s in shapes])


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [({"concat": [1]}, "concat takes a mapping"),
     ({"stack": {}}, "stack needs 'axis'"),
     ({"concat": {"axis": 0, "order": []}}, "'order' must be a non-empty list"),
     ({"concat": {"axis": 0, "order": "q, k"}}, "'order' must be a non-empty list"),
     ({"concat": {"axis": 0, "order": ["q", True]}}, "'order' items are piece names (strings), got True"),
     ({"concat": {"axis": 0, "order": ["q", ["k"]]}}, "'order' items are piece names"),
     ({"concat": {"axis": 0, "order": ["q", "k", "q"]}}, "concat 'order' lists 'q' more than once"),
     ({"stack": {"axis": 0, "order": [1, "1"]}}, "stack 'order' lists '1' more than once"),
     ({"stack": {"axis": 0, "by": 1}}, "'by' must be a template string"),
     ({"stack": {"axis": 0, "by": ""}}, "'by' must be a template string"),
     ({"stack": {"axis": 0, "oder": ["a"]}}, "unknown argument 'oder' (did you mean 'order'?)")],
)
def test_gather_bad_args(spec: object, fragment: str) -> None:
    with pytest.raises(OpError) as err:
        parse_op(spec)
    assert fragment in str(err.value)


def test_order_accepts_integers_as_piece_names() -> None:
    assert parse_op({"stack": {"axis": 0, "order": [0, 1, 2]}}) == Stack(0, None, ("0", "1", "2"))


def test_apply_ops_runs_per_tensor_then_joins_then_per_part() -> None:
    rng = np.random.default_rng(0)
    w = [rng.standard_normal((5, 4)).astype(np.float32) for _ in range(3)]  # torch Linear [out, in]
    ops = [Transpose((1, 0)), Concat(1)]
    (fused,) = apply_ops(ops, w)
    np.testing.assert_array_equal(fused, np.concatenate([x.T for x in w], axis=1))
    assert infer_ops(ops, [x.shape for x in w]) == [fused.shape] == [(4, 15)]
    c_attn = rng.standard_normal((4, 12)).astype(np.float32)  # GPT-2 Conv1D: [in, 3*out]
    q, k, v = apply_ops([Split(1, parts=3)], [c_attn])
    np.testing.assert_array_equal(np.concatenate([q, k, v], axis=1), c_attn)
    np.testing.assert_array_equal(k, c_attn[:, 4:8])
    heads = apply_ops([Split(1, parts=3), Reshape((4, 2, 2))], [c_attn])
    assert [h.shape for h in heads] == [(4, 2, 2)] * 3
    np.testing.assert_array_equal(heads[2], c_attn[:, 8:].reshape(4, 2, 2))
    assert apply_ops([], w) == w and infer_ops([], [(1,)]) == [(1,)]


def test_multi_ops_keep_bfloat16() -> None:
    bf16 = np.dtype(ml_dtypes.bfloat16)
    arr = np.arange(12, dtype=np.float32).reshape(2, 6).astype(bf16)
    parts = parse_op({"split": {"axis": 1, "sizes": [2, 4]}}).apply_many([arr])
    joined = parse_op({"concat": {"axis": 1}}).apply_many(parts)
    stacked = parse_op({"stack": {"axis": 0}}).apply_many([arr, arr])
    assert {p.dtype for p in [*parts, *joined, *stacked]} == {bf16}
    np.testing.assert_array_equal(joined[0].astype(np.float32), arr.astype(np.float32))


# ------------------------------------------------------------------------------- reading one part (--mesh)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from nnxport.mapping.ops import box_slices, pull_part  # noqa: E402


def _chain(draw: st.DrawFn) -> tuple[list[object], tuple[int, ...]]:
    """A random one-source op chain (transposes, reshapes that merge or split dims, at most one split)."""
    shape = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=4)))
    ops: list[object] = []
    current = shape
    split_done = False
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["transpose", "reshape", "split"]))
        if kind == "transpose":
            perm = draw(st.permutations(range(len(current))))
            ops.append(Transpose(tuple(perm)))
            current = tuple(current[p] for p in perm)
        elif kind == "reshape":
            if len(current) > 1 and draw(st.booleans()):  # merge two neighbours
                i = draw(st.integers(0, len(current) - 2))
                new = (*current[:i], current[i] * current[i + 1], *current[i + 2:])
            else:  # split a dim into two factors
                i = draw(st.integers(0, len(current) - 1))
                factors = [f for f in range(1, current[i] + 1) if current[i] % f == 0]
                f = draw(st.sampled_from(factors))
                new = (*current[:i], f, current[i] // f, *current[i + 1:])
            ops.append(Reshape(new))
            current = new
        elif not split_done:
            axis = draw(st.integers(0, len(current) - 1))
            factors = [f for f in range(1, current[axis] + 1) if current[axis] % f == 0]
            parts = draw(st.sampled_from(factors))
            ops.append(Split(axis, parts=parts))
            current = (*current[:axis], current[axis] // parts, *current[axis + 1:])
            split_done = True
    return ops, shape


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_pull_part_reads_exactly_the_part_that_gives_the_box(data: st.DataObject) -> None:
    ops, shape = _chain(data.draw)
    source = np.arange(int(np.prod(shape))).reshape(shape)
    results = apply_ops(ops, [source])
    position = data.draw(st.integers(0, len(results) - 1))
    result = results[position]
    box = []
    for n in result.shape:
        start = data.draw(st.integers(0, max(n - 1, 0)))
        box.append((start, data.draw(st.integers(start + 1, n))) if n else (0, 0))
    box_t = tuple(box)
    pulled = pull_part(ops, shape, position, box_t)
    assert pulled is not None
    part, steps = pulled
    arr = source[box_slices(part)]
    for step in steps:
        arr = step(arr)
    assert np.array_equal(arr, result[box_slices(box_t)])
    if all(isinstance(op, Transpose | Split) for op in ops):  # exact: nothing more is read
        assert arr.size == source[box_slices(part)].size


def test_pull_part_of_a_transposed_kernel_reads_only_its_rows() -> None:
    # A Linear weight [out=8, in=6] -> kernel [in, out]; the device holding out columns 4..8 reads rows 4..8.
    part, steps = pull_part([Transpose((1, 0))], (8, 6), 0, ((0, 6), (4, 8)))
    assert part == ((4, 8), (0, 6))
    weight = np.arange(48).reshape(8, 6)
    (step,) = steps
    assert np.array_equal(step(weight[4:8]), weight.T[:, 4:8])
    # Heads split out of a merged dim: [heads*dim=12, in=5] -> [heads=3, dim=4, in=5], head 1 alone.
    part, _ = pull_part([Reshape((3, 4, 5))], (12, 5), 0, ((1, 2), (0, 4), (0, 5)))
    assert part == ((4, 8), (0, 5))
    # The third of a fused qkv weight [in=4, 3*out=12] split on axis 1, columns 2..4 of v.
    part, _ = pull_part([Split(1, parts=3)], (4, 12), 2, ((0, 4), (2, 4)))
    assert part == ((0, 4), (10, 12))


def test_pull_part_gives_up_on_joined_tensors() -> None:
    assert pull_part([Concat(0)], (2, 3), 0, ((0, 2), (0, 3))) is None
