"""Reading mapping YAML strictly: safe, no aliases, bounded in size, every node with its line; regexes that
cannot backtrack without bound.
"""

from __future__ import annotations

import re
import re._constants as _sre_c  # the parsed form of a regex, for the static backtracking check
import re._parser as _sre
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import yaml

from nnxport.errors import MappingError
from nnxport.mapping.ops import show_value

# ------------------------------------------------------------------------------------------------ YAML

class _Dict(dict[Any, Any]):
    """A YAML mapping that remembers the 1-based line of each key."""

    key_lines: dict[Any, int]


def escaped(s: str) -> str:
    """``s`` with control characters escaped, so that every message stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


class _List(list[Any]):
    """A YAML sequence that remembers the 1-based line of each item."""

    item_lines: list[int]


MAX_MAPPING_BYTES = 1_000_000
"""The largest mapping file read (the built-in ones are under 10 kB)."""


class NoAliasLoader(yaml.SafeLoader):
    """SafeLoader refusing YAML aliases (``*name``, and so ``<<: *name`` merges): a few hundred bytes of
    nested aliases expand into billions of nodes (an "alias bomb"), and nnxport's YAML files need none."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refused: nnxport's YAML "
                                              "files may not use aliases (write the value out)",
                                              event.start_mark)
        return super().compose_node(parent, index)


class _Loader(NoAliasLoader):
    """SafeLoader building :class:`_Dict` / :class:`_List`, noting duplicate keys, refusing aliases."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_Dict]:
    data = _Dict()
    data.key_lines = {}
    yield data
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if (key_node.tag, key_node.value) in seen:
                loader.duplicates.append(f"line {key_node.start_mark.line + 1}: duplicate key "
                                         f"{show_value(key_node.value)}")
            seen.add((key_node.tag, key_node.value))
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    "found unhashable key", key_node.start_mark) from None
        data[key] = loader.construct_object(value_node)
        data.key_lines[key] = key_node.start_mark.line + 1


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> Iterator[_List]:
    data = _List()
    data.item_lines = [item.start_mark.line + 1 for item in node.value]
    yield data
    data.extend(loader.construct_sequence(node))


def _strict(construct: Callable[[_Loader, yaml.Node], object]) -> Callable[[_Loader, yaml.Node], object]:
    """A scalar constructor that reports bad values (``!!int 1.5``, ``2001-02-30``) as YAML errors.

    PyYAML's own raise ValueError, KeyError, AttributeError, ... for them.
    """

    def construct_strictly(loader: _Loader, node: yaml.Node) -> object:
        try:
            return construct(loader, node)
        except yaml.YAMLError:
            raise
        except Exception as e:
            why = f" ({e})" if type(e) is ValueError else ""
            problem = f"cannot read {show_value(node.value)} as {node.tag.rsplit(':', 1)[-1]}{why}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None

    return construct_strictly


def _yaml_error(text: str, e: Exception) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = f"{e.context}: {e.problem}" if e.context else e.problem
        return escaped(f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}")
    if isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        return escaped(f"invalid YAML at line {line}, column {column}: {e.reason} "
                       f"(character {e.character!r})")
    if isinstance(e, RecursionError):
        return "invalid YAML: nested too deeply"
    return f"invalid YAML: {escaped(str(e))}"


def parse_yaml(text: str, where: str) -> tuple[object, list[str]]:
    """The YAML document (``None`` if empty) and its duplicate-key problems; MappingError if unparsable."""
    try:
        loader = _Loader(text)
        try:
            return loader.get_single_data(), loader.duplicates
        finally:
            loader.dispose()
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise MappingError(where, [_yaml_error(text, e)]) from None


def key_line(d: object, key: object) -> int | None:
    return d.key_lines.get(key) if isinstance(d, _Dict) else None


def item_line(seq: object, i: int) -> int | None:
    return seq.item_lines[i] if isinstance(seq, _List) else None


def other_line(line: int | None, rule_line: int | None) -> int | None:
    """``line`` unless it is the rule's own line (already in the rule's label)."""
    return None if line == rule_line else line


# ---------------------------------------------------------------------------------------------- loading

def compile_regex(regex: str) -> re.Pattern[str] | str:
    """The compiled regex, or why it is not one (or why it could take exponential time)."""
    try:
        compiled = re.compile(regex)
        backtracks = _backtracks(_sre.parse(regex).data, in_repeat=False)
    except (re.error, OverflowError, RecursionError) as e:
        return str(e)
    if backtracks:
        return (f"{backtracks} inside a repeat (like (a+)+ or (a|ab)*) can take exponential time to match "
                "a long key; use a single repeat, or make the inner one possessive (a++) or atomic (?>...)")
    return compiled


_REPEATS = (_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT, _sre_c.POSSESSIVE_REPEAT)


def _backtracks(items: Any, *, in_repeat: bool) -> str | None:
    """Static check against catastrophic backtracking on a parsed regex: what, inside a repeat, could
    match one string in many ways ("a repeat", "an alternation"), or None. ``re`` cannot be time-bound
    (it holds the GIL while it matches), so such regexes are refused at load time."""
    for op, av in items:
        if op in _REPEATS:
            _low, high, body = av
            repeats = high > 1 or high == _sre_c.MAXREPEAT
            if repeats and in_repeat and op is not _sre_c.POSSESSIVE_REPEAT:
                return "a repeat"
            found = _backtracks(body, in_repeat=in_repeat or (repeats and op is not _sre_c.POSSESSIVE_REPEAT))
        elif op is _sre_c.ATOMIC_GROUP:
            found = _backtracks(av, in_repeat=False)
        elif op is _sre_c.SUBPATTERN:
            found = _backtracks(av[-1], in_repeat=in_repeat)
        elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
            found = _backtracks(av[1], in_repeat=in_repeat)
        elif op is _sre_c.BRANCH:
            if in_repeat and _overlapping(av[1]):
                return "an alternation whose branches can start alike"
            found = next((f for b in av[1] if (f := _backtracks(b, in_repeat=in_repeat))), None)
        elif op is _sre_c.GROUPREF_EXISTS:
            found = next((f for b in av[1:] if b is not None and (f := _backtracks(b, in_repeat=in_repeat))),
                         None)
        else:
            continue
        if found:
            return found
    return None


def _overlapping(branches: Sequence[Any]) -> bool:
    """Whether two alternatives of a branch may start with the same character (unknown counts as yes)."""
    seen: set[int] = set()
    for branch in branches:
        items = list(branch)
        while items and items[0][0] is _sre_c.SUBPATTERN:  # (?:...) / (...) around the first item
            items = list(items[0][1][-1]) + items[1:]
        if not items:
            return True
        op, av = items[0]
        if op is _sre_c.LITERAL:
            first = {av}
        elif op is _sre_c.IN and all(o is _sre_c.LITERAL for o, _ in av):
            first = {v for _, v in av}
        else:
            return True
        if first & seen:
            return True
        seen |= first
    return False


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)
for _tag in [f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "int", "float", "binary", "timestamp")]:
    _Loader.add_constructor(_tag, _strict(yaml.SafeLoader.yaml_constructors[_tag]))
