"""A token trie over NATS patterns: which patterns match a subject, which intersect a pattern.

Overlap detection used to compare a new pattern with every existing one; this
index answers both questions by walking only the branches that can match, so the
cost of a query depends on the pattern's length and on the size of its answer,
not on how many patterns are stored.
"""

from __future__ import annotations

from typing import Generic, TypeVar

V = TypeVar("V")

__all__ = ["PatternTrie"]


class _Node(Generic[V]):
    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: list[V] = []


class PatternTrie(Generic[V]):
    """pattern → values (several values may share one pattern)."""

    __slots__ = ("_root", "_size")

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, pattern: str, value: V) -> None:
        node = self._root
        for token in pattern.split("."):
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node()
            node = child
        node.values.append(value)
        self._size += 1

    def remove(self, pattern: str, value: V) -> bool:
        """Remove one ``value`` stored under ``pattern``; empty branches are pruned."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
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
        self._size -= 1
        for parent, token in reversed(path):
            if node.values or node.children:
                break
            del parent.children[token]
            node = parent
        return True

    def matching(self, subject: str) -> list[V]:
        """Values of every pattern that matches the concrete ``subject``."""
        out: list[V] = []
        _match(self._root, subject.split("."), 0, out)
        return out

    def intersecting(self, pattern: str) -> list[V]:
        """Values of every pattern that some concrete subject matches together with ``pattern``."""
        out: list[V] = []
        _intersect(self._root, pattern.split("."), 0, out)
        return out


def _match(node: _Node[V], tokens: list[str], i: int, out: list[V]) -> None:
    if i == len(tokens):
        out.extend(node.values)
        return
    children = node.children
    tail = children.get(">")
    if tail is not None:
        out.extend(tail.values)
    child = children.get(tokens[i])
    if child is not None:
        _match(child, tokens, i + 1, out)
    star = children.get("*")
    if star is not None:
        _match(star, tokens, i + 1, out)


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
