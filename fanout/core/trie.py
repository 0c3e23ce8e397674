"""A token trie over NATS patterns: which patterns match a subject, which intersect a pattern.

Overlap detection used to compare a new pattern with every existing one; this
index answers both questions by walking only the branches that can match, so the
cost of a query depends on the pattern's length and on the size of its answer,
not on how many patterns are stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

V = TypeVar("V")

#: Up to this many stem lengths in use, a concrete query tries each; past it, the
#: start of each of its own tokens (never more lookups than the subject has tokens).
_FEW_STEM_LENGTHS = 8

__all__ = ["PatternTrie"]


class _Node(Generic[V]):
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: list[V] = []


class _Parent(Generic[V]):
    """A node of the concrete patterns' tree: the prefix every pattern of ``last`` continues."""

    __slots__ = ("children", "last")

    def __init__(self) -> None:
        self.children: dict[str, _Parent[V]] = {}
        #: last token → values of the concrete pattern ``<this node's prefix>.<token>``.
        self.last: dict[str, list[V]] = {}


class PatternTrie(Generic[V]):
    """pattern → values (several values may share one pattern).

    Concrete patterns (no wildcard token, the usual subscription) are kept in a
    dict, so a concrete query finds them with one lookup. For wildcard queries the
    concrete patterns are also grouped by their prefix (all tokens but the
    last) in a tree of prefixes; the group of a known prefix is found by one
    dict lookup, so adding or removing a concrete pattern walks that tree only
    when its group is the first or last of its prefix.

    Wildcard patterns are kept twice: in a token tree (wildcard queries walk
    it) and by their literal stem, the tokens before the first wildcard
    (``a.b.`` for ``a.b.*.c``), each stem with a small token tree of what
    follows. A concrete query (every ``sub``, every copy of a message on
    overlapping subscriptions) looks up its own leading text at each stem
    length in use, a slice and a dict lookup each, and walks only the trees
    of the stems it starts with: no token-by-token walk down the common stem.
    """

    __slots__ = (
        "_concrete",
        "_concrete_root",
        "_groups",
        "_size",
        "_stem_lengths",
        "_stems",
        "_wild_root",
    )

    def __init__(self) -> None:
        self._concrete: dict[str, list[V]] = {}
        #: prefix → its non-empty group (the ``last`` dict of its _Parent).
        self._groups: dict[str, dict[str, list[V]]] = {}
        self._concrete_root: _Parent[V] = _Parent()
        self._wild_root: _Node[V] = _Node()
        #: stem (``""`` or literal tokens with their trailing dot) → tree of the rests.
        self._stems: dict[str, _Node[V]] = {}
        #: len(stem) → how many stems have that length.
        self._stem_lengths: dict[int, int] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, value: V) -> None:
        self._size += 1
        if "*" in pattern or ">" in pattern:
            _leaf(self._wild_root, pattern).values.append(value)
            stem, rest = _stem(pattern)
            root = self._stems.get(stem)
            if root is None:
                root = self._stems[stem] = _Node()
                lengths = self._stem_lengths
                lengths[len(stem)] = lengths.get(len(stem), 0) + 1
            _leaf(root, rest).values.append(value)
            return
        values = self._concrete.get(pattern)
        if values is None:
            prefix, _, last = pattern.rpartition(".")
            group = self._groups.get(prefix)
            if group is None:
                group = self._groups[prefix] = _parent(self._concrete_root, prefix).last
            values = self._concrete[pattern] = group[last] = []
        values.append(value)

    def remove(self, pattern: str, value: V) -> bool:
        """Remove one ``value`` stored under ``pattern``; empty branches are pruned."""
        if "*" in pattern or ">" in pattern:
            removed = _remove(self._wild_root, pattern, value)
            if removed:
                self._remove_stemmed(pattern, value)
        else:
            values = self._concrete.get(pattern)
            if values is None or value not in values:
                return False
            values.remove(value)
            if not values:
                del self._concrete[pattern]
                prefix, _, last = pattern.rpartition(".")
                group = self._groups[prefix]
                del group[last]
                if not group:
                    del self._groups[prefix]
                    _prune(self._concrete_root, prefix)
            removed = True
        if removed:
            self._size -= 1
        return removed

    def _remove_stemmed(self, pattern: str, value: V) -> None:
        stem, rest = _stem(pattern)
        root = self._stems[stem]
        _remove(root, rest, value)
        if not root.children:
            del self._stems[stem]
            lengths = self._stem_lengths
            left = lengths[len(stem)] - 1
            if left:
                lengths[len(stem)] = left
            else:
                del lengths[len(stem)]

    def matching(self, subject: str) -> list[V]:
        """Values of every pattern that matches the concrete ``subject``."""
        found = self._concrete.get(subject)
        out: list[V] = [] if found is None else found.copy()
        stems = self._stems
        if stems:
            lengths: Iterable[int] = self._stem_lengths
            if len(self._stem_lengths) > _FEW_STEM_LENGTHS:
                lengths = _token_starts(subject)
            for length in lengths:
                root = stems.get(subject[:length])
                if root is not None and length < len(subject):
                    _match(root, subject[length:].split("."), 0, out)
        return out

    def intersecting(self, pattern: str) -> list[V]:
        """Values of every pattern that some concrete subject matches together with ``pattern``."""
        if "*" not in pattern and ">" not in pattern:
            return self.matching(pattern)
        out: list[V] = []
        tokens = pattern.split(".")
        _intersect(self._wild_root, tokens, 0, out)
        _intersect_concrete(self._concrete_root, tokens, 0, out)
        return out


def _stem(pattern: str) -> tuple[str, str]:
    """``a.b.*.c`` → (``a.b.``, ``*.c``): the literal tokens before the first wildcard
    token (with their trailing dot, or ``""``), and the rest."""
    tokens = pattern.split(".")
    k = next((i for i, token in enumerate(tokens) if token == "*" or token == ">"), len(tokens))
    return ".".join(tokens[:k]) + "." if k else "", ".".join(tokens[k:])


def _token_starts(subject: str) -> list[int]:
    """Where each token of ``subject`` starts: the stem lengths it can begin with."""
    starts = [0]
    dot = subject.find(".")
    while dot >= 0:
        starts.append(dot + 1)
        dot = subject.find(".", dot + 1)
    return starts


def _parent(root: _Parent[V], prefix: str) -> _Parent[V]:
    """The node of ``prefix`` ("" is the root), made on the way if missing."""
    node = root
    if prefix:
        for token in prefix.split("."):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Parent()
            node = child
    return node


def _prune(root: _Parent[V], prefix: str) -> None:
    """``prefix`` lost its last group: drop its node and the ancestors left empty."""
    if not prefix:
        return
    path: list[tuple[_Parent[V], str]] = []
    node = root
    for token in prefix.split("."):
        path.append((node, token))
        node = node.children[token]
    for parent, token in reversed(path):
        if node.last or node.children:
            break
        del parent.children[token]
        node = parent


def _concrete_below(node: _Parent[V], out: list[V]) -> None:
    """Every concrete pattern under ``node``'s prefix (one or more further tokens)."""
    for values in node.last.values():
        out.extend(values)
    for child in node.children.values():
        _concrete_below(child, out)


def _intersect_concrete(node: _Parent[V], tokens: list[str], i: int, out: list[V]) -> None:
    """Concrete patterns matching the wildcard pattern ``tokens``; ``node`` is ``tokens[:i]``."""
    token = tokens[i]
    if token == ">":
        _concrete_below(node, out)
        return
    if i == len(tokens) - 1:
        if token == "*":
            for values in node.last.values():
                out.extend(values)
        else:
            found = node.last.get(token)
            if found is not None:
                out.extend(found)
        return
    if token == "*":
        for child in node.children.values():
            _intersect_concrete(child, tokens, i + 1, out)
        return
    exact = node.children.get(token)
    if exact is not None:
        _intersect_concrete(exact, tokens, i + 1, out)


def _leaf(root: _Node[V], pattern: str) -> _Node[V]:
    """The node of ``pattern`` under ``root``, made on the way if missing."""
    node = root
    for token in pattern.split("."):
        child = node.children.get(token)
        if child is None:
            child = node.children[token] = _Node()
        node = child
    return node


def _remove(root: _Node[V], pattern: str, value: V) -> bool:
    path: list[tuple[_Node[V], str]] = []
    node = root
    for token in pattern.split("."):
        child = node.children.get(token)
        if child is None:
            return False
        path.append((node, token))
        node = child
    try:
        node.values.remove(value)
    except ValueError:
        return False
    for parent, token in reversed(path):
        if node.values or node.children:
            break
        del parent.children[token]
        node = parent
    return True


def _match(node: _Node[V], tokens: list[str], start: int, out: list[V]) -> None:
    """Wildcard patterns under ``node`` that match ``tokens[start:]``: down the literal
    path in a loop, a recursion only where a ``*`` branches off (the usual query meets
    one or two wildcards on its way, not a tree)."""
    for i in range(start, len(tokens)):
        children = node.children
        tail = children.get(">")
        if tail is not None:
            out.extend(tail.values)
        star = children.get("*")
        if star is not None:
            _match(star, tokens, i + 1, out)
        child = children.get(tokens[i])
        if child is None:
            return
        node = child
    out.extend(node.values)


def _subtree(node: _Node[V], out: list[V]) -> None:
    for child in node.children.values():
        out.extend(child.values)
        _subtree(child, out)


def _intersect(node: _Node[V], tokens: list[str], i: int, out: list[V]) -> None:
    if i == len(tokens):
        out.extend(node.values)
        return
    token = tokens[i]
    children = node.children
    if token == ">":
        # one or more tokens: every stored pattern with at least one more token
        _subtree(node, out)
        return
    tail = children.get(">")
    if tail is not None:
        out.extend(tail.values)
    if token == "*":
        for key, child in children.items():
            if key != ">":
                _intersect(child, tokens, i + 1, out)
        return
    exact = children.get(token)
    if exact is not None:
        _intersect(exact, tokens, i + 1, out)
    star = children.get("*")
    if star is not None:
        _intersect(star, tokens, i + 1, out)
