"""nnxport.ops: parsing, config expressions, shape inference vs numpy, dtype preservation, errors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from nnxport.ops import OPS, Expr, OpError, Reshape, Transpose, parse_op, show_value

CONFIG = {"num_attention_heads": 4, "hidden_size": 32, "flag": True, "ratio": 0.5, "name": "x", "zero": 0}


def test_registry_holds_both_ops() -> None:
    assert dict(OPS) == {"transpose": Transpose, "reshape": Reshape}


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
    [({"flip": [0]}, "unknown op 'flip'; known ops: reshape, transpose"),
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
