"""The one state-dict walker: container types round-trip exactly, aliasing survives, leaves are untouched."""

from __future__ import annotations

from collections import OrderedDict, defaultdict, namedtuple

import pytest
import torch

from lightning_ckpt import tree

Point = namedtuple("Point", ["x", "y"])


class Tagged(dict):
    """A dict subclass with an attribute, like a module's state_dict with ``_metadata``."""


def _nested() -> dict:
    od = OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(3))])
    od._metadata = {"": {"version": 1}}
    dd = defaultdict(list, {"k": [torch.arange(4)]})
    tagged = Tagged(w=torch.full((2,), 7.0))
    tagged.note = "kept"
    return {"od": od, "dd": dd, "tagged": tagged, "nt": Point(torch.ones(1), 5), "tup": (1, torch.zeros(1), "s"),
            "lst": [None, 2.5, {3: torch.ones(2)}], "empty": {}, "etup": (), "obj": object}


def _same_types(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        assert a.__dict__ == b.__dict__ if hasattr(a, "__dict__") else True
        for k in a:
            _same_types(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_types(x, y)


@pytest.mark.timeout(30)
def test_rebuild_keeps_every_container_type_and_attribute():
    state = _nested()
    rebuilt = tree.flatten(state).rebuild()
    _same_types(state, rebuilt)
    assert rebuilt["od"]._metadata == {"": {"version": 1}}
    assert rebuilt["dd"].default_factory is list
    assert rebuilt["tagged"].note == "kept"
    assert isinstance(rebuilt["nt"], Point) and rebuilt["nt"].y == 5
    assert rebuilt is not state and rebuilt["od"] is not state["od"]  # new containers, the input is not changed


@pytest.mark.timeout(30)
def test_leaves_are_the_same_objects_and_non_tensor_leaves_untouched():
    state = _nested()
    flat = tree.flatten(state)
    rebuilt = flat.rebuild()
    assert rebuilt["od"]["b"] is state["od"]["b"]
    assert rebuilt["obj"] is object and rebuilt["lst"][1] == 2.5 and rebuilt["tup"][2] == "s"
    assert sum(isinstance(x, torch.Tensor) for x in flat.leaves) == 7


@pytest.mark.timeout(30)
def test_paths_go_into_namedtuples_and_tuples_and_use_json_keys():
    paths = dict(tree.iter_leaves(_nested()))
    assert ("nt", 0) in paths and ("tup", 1) in paths  # namedtuples and tuples are containers, not leaves
    assert ("lst", 2, 3) in paths  # int keys stay ints
    assert tree.flatten({(1, 2): torch.ones(1)}, paths=True).paths == [("(1, 2)",)]  # other keys: their repr
    assert list(tree.iter_leaves({"a": 1}, prefix=("p",))) == [(("p", "a"), 1)]


@pytest.mark.timeout(30)
def test_map_leaves_replaces_leaves_in_place_of_the_old_ones():
    state = _nested()
    doubled = tree.map_leaves(lambda x: x * 2 if isinstance(x, torch.Tensor) else x, state)
    assert torch.equal(doubled["nt"].x, torch.full((1,), 2.0))
    assert torch.equal(state["nt"].x, torch.ones(1))
    seen = tree.map_leaves_with_paths(lambda p, x: p, {"a": [1, {"b": 2}]})
    assert seen == {"a": [("a", 0), {"b": ("a", 1, "b")}]}


@pytest.mark.timeout(30)
def test_shared_tensors_and_shared_containers_stay_shared():
    weight = torch.ones(3)
    shared_list = [weight]
    state = {"w": weight, "tied": weight, "one": shared_list, "two": shared_list}
    flat = tree.flatten(state)
    rebuilt = flat.rebuild()
    assert rebuilt["w"] is rebuilt["tied"] is weight
    assert rebuilt["one"] is rebuilt["two"] and rebuilt["one"] is not shared_list
    assert len(flat.leaves) == 3  # the shared list is walked once


@pytest.mark.timeout(30)
def test_a_cycle_is_refused_with_its_key_path():
    state: dict = {"a": {"b": []}}
    state["a"]["b"].append(state["a"])
    with pytest.raises(ValueError, match="a.b.0"):
        tree.flatten(state)


@pytest.mark.timeout(30)
def test_non_container_root_and_wrong_leaf_count():
    flat = tree.flatten(torch.ones(1), paths=True)
    assert flat.paths == [()] and flat.rebuild(["x"]) == "x"
    with pytest.raises(ValueError, match="needs 1 leaves, got 2"):
        flat.rebuild([1, 2])
    with pytest.raises(ValueError, match="without paths"):
        list(tree.flatten({"a": 1}).items())
