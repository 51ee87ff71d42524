"""The one walk over state dicts: nested dicts, lists, tuples and namedtuples flattened to leaves and rebuilt.

Every module that looks inside a state dict (staging, pickling, verification, loading, snapshot clones) goes
through ``flatten``/``Tree.rebuild`` (or ``iter_leaves``/``map_leaves`` built on them), so they agree on what a
container is and on the key path of each leaf:

- containers are ``dict`` (and subclasses: ``OrderedDict``, ``defaultdict``, a state dict's ``_metadata``
  attribute are kept by the rebuild), ``list``, ``tuple`` and namedtuples (rebuilt field by field); everything
  else, tensors included, is a leaf and is never looked into;
- a key path is a tuple of ``json_key(dict key)`` and list/tuple indices, e.g. ``("optimizer_states", 0, "state")``;
- a container reached twice (the same object) is walked once and rebuilt as one shared object; a container
  that contains itself is refused (``ValueError`` naming its key path).
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

KeyPath = tuple  # path of a leaf inside nested containers, e.g. ("state_dict", "layer.weight")

_DICT, _LIST, _TUPLE, _NAMEDTUPLE, _ALIAS = range(5)


def json_key(key: Any) -> Any:
    """A dict key as it appears in a key path (str and int as they are; anything else as its repr)."""
    return key if isinstance(key, (str, int)) and not isinstance(key, bool) else repr(key)


def path_str(path: KeyPath | list) -> str:
    """A key path as one dotted string, for messages."""
    return ".".join(str(p) for p in path)


def is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


class _Node:
    """One container of a flattened tree: its kind, the original (a template for its type), and its children."""

    __slots__ = ("kind", "template", "keys", "children", "shared")

    def __init__(self, kind: int, template: Any, keys: list | None, children: list) -> None:
        self.kind = kind
        self.template = template
        self.keys = keys
        self.children = children  # _Node, or None for a leaf
        self.shared = False  # reached more than once: rebuilt once and reused


class Tree:
    """A flattened state dict: its ``leaves`` in depth-first order, their key ``paths`` (when asked for), and
    what ``rebuild`` needs to put new leaves into the same structure.

    Attributes:
        leaves: every leaf, depth first, in container order (dict insertion order, list/tuple index).
        paths: the key path of each leaf (None unless ``flatten(..., paths=True)``).
    """

    __slots__ = ("leaves", "paths", "_root")

    def __init__(self, root: _Node | None, leaves: list, paths: list[KeyPath] | None) -> None:
        self._root = root
        self.leaves = leaves
        self.paths = paths

    def items(self) -> Iterator[tuple[KeyPath, Any]]:
        """``(key path, leaf)`` pairs (needs ``paths=True``)."""
        if self.paths is None:
            raise ValueError("this Tree was flattened without paths; use flatten(obj, paths=True)")
        return zip(self.paths, self.leaves)

    def with_leaves(self, leaves: list) -> "Tree":
        """The same structure and paths with other leaves (one per original leaf, in order)."""
        if len(leaves) != len(self.leaves):
            raise ValueError(f"Tree.with_leaves needs {len(self.leaves)} leaves, got {len(leaves)}")
        return Tree(self._root, leaves, self.paths)

    def rebuild(self, leaves: list | None = None) -> Any:
        """The structure with ``leaves`` (default: the original ones) in place of the original leaves.

        Containers are new objects of the original types (namedtuples through their fields, dict subclasses by a
        shallow copy whose items are then replaced, so ``OrderedDict``'s order, ``defaultdict``'s factory and
        attributes such as a ``state_dict``'s ``_metadata`` survive); leaves are placed as given.

        Raises:
            ValueError: ``leaves`` does not have one entry per original leaf.
        """
        leaves = self.leaves if leaves is None else leaves
        if len(leaves) != len(self.leaves):
            raise ValueError(f"Tree.rebuild needs {len(self.leaves)} leaves, got {len(leaves)}")
        if self._root is None:
            return leaves[0]
        return _build(self._root, iter(leaves), {})


def flatten(obj: Any, paths: bool = False) -> Tree:
    """Flatten ``obj`` (any nesting of dicts, lists, tuples and namedtuples) into a ``Tree``.

    Args:
        obj: the state dict (or any value: a non-container is a tree of one leaf).
        paths: also record each leaf's key path (costs a tuple per leaf).

    Raises:
        ValueError: a container contains itself (names its key path).
    """
    leaves: list = []
    out_paths: list[KeyPath] | None = [] if paths else None
    if _kind(obj) is None:
        leaves.append(obj)
        if out_paths is not None:
            out_paths.append(())
        return Tree(None, leaves, out_paths)
    try:
        root = _flatten(obj, (), leaves, out_paths, {}, set())
    except ValueError:
        if not paths:  # walked without key paths: walk again with them, for a message that names the place
            flatten(obj, paths=True)
        raise
    return Tree(root, leaves, out_paths)


def iter_leaves(obj: Any, prefix: KeyPath = ()) -> Iterator[tuple[KeyPath, Any]]:
    """``(key path, leaf)`` for every leaf of ``obj``, depth first, each path starting with ``prefix``."""
    tree = flatten(obj, paths=True)
    if prefix:
        return ((prefix + p, leaf) for p, leaf in zip(tree.paths, tree.leaves))
    return tree.items()


def map_leaves(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``obj`` rebuilt with ``fn(leaf)`` in place of every leaf (``fn`` sees a leaf reached twice twice)."""
    tree = flatten(obj)
    return tree.rebuild([fn(leaf) for leaf in tree.leaves])


def map_leaves_with_paths(fn: Callable[[KeyPath, Any], Any], obj: Any) -> Any:
    """``obj`` rebuilt with ``fn(key_path, leaf)`` in place of every leaf."""
    tree = flatten(obj, paths=True)
    return tree.rebuild([fn(p, leaf) for p, leaf in zip(tree.paths, tree.leaves)])


_LEAF = -1
_KIND_BY_TYPE: dict[type, int] = {dict: _DICT, list: _LIST, tuple: _TUPLE}  # grows by the types met


def _kind(obj: Any) -> int | None:
    kind = _KIND_BY_TYPE.get(type(obj))
    if kind is None:
        kind = _KIND_BY_TYPE[type(obj)] = _classify(type(obj))
    return None if kind == _LEAF else kind


def _classify(t: type) -> int:
    if issubclass(t, dict):
        return _DICT
    if issubclass(t, list):
        return _LIST
    if issubclass(t, tuple):
        return _NAMEDTUPLE if hasattr(t, "_fields") else _TUPLE
    return _LEAF


def _flatten(obj: Any, prefix: KeyPath, leaves: list, paths: list | None, seen: dict, active: set) -> _Node:
    ident = id(obj)
    node = seen.get(ident)
    if node is not None:
        if ident in active:
            raise ValueError(f"the state dict contains itself at key '{path_str(prefix)}' (a reference cycle)")
        node.shared = True
        return _Node(_ALIAS, obj, None, [])
    kind = _kind(obj)
    keys = list(obj) if kind == _DICT else None
    node = seen[ident] = _Node(kind, obj, keys, [])
    children = node.children
    add_child, add_leaf = children.append, leaves.append
    active.add(ident)
    values = obj.values() if keys is not None else obj
    if paths is None:
        for value in values:
            if _KIND_BY_TYPE.get(type(value)) == _LEAF or _kind(value) is None:
                add_child(None)
                add_leaf(value)
            else:
                add_child(_flatten(value, prefix, leaves, None, seen, active))
    else:
        add_path = paths.append
        names = keys if keys is not None else range(len(obj))
        for key, value in zip(names, values):
            if type(key) is not str and type(key) is not int:
                key = json_key(key)
            if _KIND_BY_TYPE.get(type(value)) == _LEAF or _kind(value) is None:
                add_child(None)
                add_leaf(value)
                add_path(prefix + (key,))
            else:
                add_child(_flatten(value, prefix + (key,), leaves, paths, seen, active))
    active.discard(ident)
    return node


def _build(node: _Node, leaves: Iterator, memo: dict) -> Any:
    if node.kind == _ALIAS:
        return memo[id(node.template)]
    values = [next(leaves) if child is None else _build(child, leaves, memo) for child in node.children]
    kind, template = node.kind, node.template
    if kind == _DICT:
        if type(template) is dict:
            out: Any = dict(zip(node.keys, values))
        else:
            out = copy.copy(template)  # keeps the type, its attributes, OrderedDict order, defaultdict factory
            for k, v in zip(node.keys, values):
                out[k] = v
    elif kind == _LIST:
        out = values if type(template) is list else _copy_list(template, values)
    elif kind == _NAMEDTUPLE:
        out = type(template)(*values)
    else:
        out = tuple(values) if type(template) is tuple else type(template)(values)
    if node.shared:
        memo[id(template)] = out
    return out


def _copy_list(template: list, values: list) -> list:
    out = copy.copy(template)
    out[:] = values
    return out
