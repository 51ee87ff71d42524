"""Where each tensor of a state dict goes in a staging buffer (a storage per large tensor, one per run of small ones),
and the staged structure built from that plan."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from lightning_ckpt import tree
from lightning_ckpt.serialization import StorageLayout, as_kind_of, has_bits, pickles_as_view, raw_view
from lightning_ckpt.torch_zip import ALIGNMENT as STORAGE_ALIGNMENT
from lightning_ckpt.torch_zip import DIRECT_IO_ALIGNMENT, DIRECT_IO_MIN_BYTES

# Tensors smaller than this share one storage with the other small tensors of their dtype (a "run"): one staging
# region, one file record and one checksum for the run instead of one each, which is what keeps a state of 100k
# small tensors (a large model's per-parameter optimizer state) cheap. Loaded back, they are views of that storage.
# A run never mixes top-level entries of the saved dict (``state_dict``, ``optimizer_states``, ``callbacks``...), nor
# the items of a top-level list of containers (Lightning's ``optimizer_states``: one state dict per optimizer), so
# that re-saving one entry after ``torch.load`` (exporting the weights) does not drag the others along.
SMALL_TENSOR_BYTES = 64 << 10
RUN_BYTES = 4 << 20  # a run closes at this size (a partial load of one small tensor reads at most one run)
PACK_LIMIT_BYTES = 256 << 20  # the most a synchronous write copies to pack small tensors (the rest stay live)


def _align(n: int, alignment: int = STORAGE_ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass
class Region:
    """One storage in the staging buffer: a large tensor of its own, or a run of small tensors of one dtype and one
    run group, packed back to back (each starts where the previous one ends, so one ``split`` carves them all)."""

    index: int  # in the plan's regions
    dtype: torch.dtype
    element_size: int
    members: list[int] = field(default_factory=list)  # copy indices
    spans: list[int] = field(default_factory=list)  # elements each member's copy spans, in order
    nbytes: int = 0
    offset: int = 0  # in the buffer, set once every region is known


class StagingPlan:
    """The staging layout of one state dict, computed from one walk over it (``tree.flatten``).

    Attributes:
        tree: the flattened state dict (leaves and key paths).
        copies: ``(source, offset in the buffer, nbytes)`` per distinct stageable tensor. The source is the bytes a
            copy takes: the tensor itself, or (strides other than contiguous ones: transposed, channels_last,
            expanded, sliced) the flat span of its storage from its lowest to its highest addressed element, which
            ``views`` then views with the tensor's own size and strides; conj/neg bits stripped (``raw_view``).
        leaf_copy: per leaf, the index of its copy, or -1 for a leaf that is not staged.
        special: indices of the leaves ``torch.save`` does not write as bare views (``pickles_as_view``): their
            staged copies are presented as the same kind of tensor (``as_kind_of``).
        regions: the storages the copies are carved from, in buffer order.
        nbytes: the buffer size the plan needs.

    ``extra``: ``(dtype, shape)`` of tensors the state will hold but does not yet (e.g. optimizer moments before
    the first step), counted in ``nbytes`` only: how large a buffer to prepare ahead of the first save.

    ``owned_small_only`` (a synchronous write, which otherwise writes the live tensors): plan only the small tensors
    that are the one view of a storage of their own (``_owned_small_tensors``), so that packing them into runs
    keeps every aliasing ``torch.save`` would keep; with ``limit_bytes``, no more than that many bytes of them.
    """

    def __init__(self, state_dict: Any, extra: Iterable[tuple[torch.dtype, torch.Size]] = (), *,
                 owned_small_only: bool = False, limit_bytes: int | None = None) -> None:
        self.tree = tree.flatten(state_dict, paths=True)
        self.copies: list[tuple[torch.Tensor, int, int]] = []
        self.leaf_copy: list[int] = []
        self.special: set[int] = set()
        self.regions: list[Region] = []
        # per copy: (region index, storage offset in elements, shape)
        self.member_info: list[tuple[int, int, tuple]] = []
        self.strides: list[tuple | None] = []  # per copy: its tensor's strides, None when contiguous ones
        self._idents: list[tuple] = []  # per copy: (data_ptr, dtype, shape, stride, device) of its source
        self.scalars: dict[tuple, list[int]] = {}  # leaf indices of 0-dim CPU tensors, per (run group, dtype)
        self._open_runs: dict[torch.dtype, Region] = {}  # of the current run group
        self._split = _split_keys(state_dict)
        self._group: tuple | None = None
        if owned_small_only:
            self._plan_owned(_owned_small_tensors(self.tree.leaves), limit_bytes)
        else:
            self._plan_regions()
        for dtype, shape in extra:  # tensors not there yet (an estimate): laid out as if they followed the leaves
            self._add_copy(torch.empty(shape, dtype=dtype, device="meta"), len(self.copies), tuple(shape))
        self.nbytes = self._place_regions()

    def _plan_regions(self) -> None:
        """Which leaves are copied into the buffer: strided, non-empty, non-quantized, not on the meta device, and
        not 0-dim. 0-dim tensors (scores, step counters) are copied at stage time instead, into one new storage per
        run group and dtype (``Scalars``): they change between the saves of one step (ModelCheckpoint's best score), and keeping
        them out of the buffer and of the snapshot signature lets such saves share the staged copy of the rest."""
        by_identity: dict[tuple, int] = {}
        leaf_copy, strided, paths, special = self.leaf_copy, torch.strided, self.tree.paths, self.special
        head = sub = None
        for i, leaf in enumerate(self.tree.leaves):
            if not isinstance(leaf, torch.Tensor):
                leaf_copy.append(-1)
                continue
            plain = pickles_as_view(leaf)
            if not plain:
                special.add(i)
            device = leaf.device
            if leaf.layout != strided or device.type == "meta" or leaf.is_quantized or leaf.numel() == 0:
                leaf_copy.append(-1)
                continue
            path = paths[i]
            if path[0] is not head or (sub is not None and path[1] is not sub):
                head, sub = self._enter_group(path)
            if leaf.dim() == 0:
                leaf_copy.append(-1)
                if device.type == "cpu" and (plain or type(leaf) in _PLAIN_TENSORS and not has_bits(leaf)):
                    self.scalars.setdefault((self._group, leaf.dtype), []).append(i)
                continue
            shape = tuple(leaf.shape)  # read once, reused for identity, signature, carving and pickling
            stride = leaf.stride()
            ident = (leaf.data_ptr(), leaf.dtype, shape, stride, device)
            index = by_identity.get(ident)
            if index is None:
                index = by_identity[ident] = len(self.copies)
                self._idents.append(ident)
                self._add_copy(leaf if plain else raw_view(leaf), index, shape, stride)
            leaf_copy.append(index)

    def _plan_owned(self, owned: dict[int, tuple[tuple, int]], limit_bytes: int | None) -> None:
        """The plan of ``owned_small_only``: those tensors only (0-dim ones as ``scalars``), in leaf order, until
        ``limit_bytes`` is spent. ``owned``: ``{leaf index: ((address, dtype, shape), nbytes)}``."""
        leaves, paths = self.tree.leaves, self.tree.paths
        self.leaf_copy = leaf_copy = [-1] * len(leaves)
        by_identity: dict[tuple, int] = {}
        left = limit_bytes
        head = sub = None
        for i, (ident, nbytes) in owned.items():
            if left is not None:
                left -= nbytes
                if left < 0:
                    break
            path = paths[i]
            if path[0] is not head or (sub is not None and path[1] is not sub):
                head, sub = self._enter_group(path)
            shape = ident[2]
            if not shape:
                self.scalars.setdefault((self._group, ident[1]), []).append(i)
                continue
            index = by_identity.get(ident)
            if index is None:
                index = by_identity[ident] = len(self.copies)
                self._idents.append(ident)
                self._add_copy(leaves[i], index, shape)
            leaf_copy[i] = index

    def _enter_group(self, path: tuple) -> tuple:
        """Start new runs when the tensor at ``path`` is in another run group than the previous one (leaves come
        depth first, so a group's tensors are consecutive): tensors directly at the top level form one group; the
        others are grouped by their top-level entry, and by the item of a top-level list (or tuple) of containers.

        Returns ``(path[0], path[1] or None)``: the next tensors whose paths start so (the very same key objects,
        as ``tree.flatten`` makes them) are in this group without asking again.
        """
        split = path[0] in self._split and len(path) > 1
        if split and len(path) > 2:
            group = path[:2]
        else:
            group = path[:1] if len(path) > 1 else ()
        if group != self._group:
            self._group = group
            self._open_runs = {}
        return (path[0] if len(path) > 1 else None), (path[1] if split else None)

    def _add_copy(self, leaf: torch.Tensor, index: int, shape: tuple, stride: tuple | None = None) -> None:
        """Put copy ``index`` into a region: its own when large, else the open run of its dtype (or a new run).
        A tensor without contiguous strides takes the span of its storage it uses (a stride-0 expanded tensor: one
        element; a transposed or channels_last one: its numel), copied flat and viewed with its own strides."""
        open_runs = self._open_runs
        size = leaf.element_size()
        if stride is None or (leaf.is_contiguous() and (1 not in shape or stride == _contiguous_strides(shape))):
            span, stride = leaf.numel(), None
        else:  # strides are never negative: the lowest element is at the storage offset
            span = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            leaf = leaf.detach().as_strided((span,), (1,))
        nbytes = span * size
        small = nbytes < SMALL_TENSOR_BYTES
        region = open_runs.get(leaf.dtype) if small else None
        if region is None or region.nbytes + nbytes > RUN_BYTES:
            region = Region(len(self.regions), leaf.dtype, size)
            self.regions.append(region)
            if small:
                open_runs[leaf.dtype] = region
        self.copies.append((leaf, region.nbytes, nbytes))  # the offset in the region until regions are placed
        self.member_info.append((region.index, region.nbytes // size, shape))
        self.strides.append(stride)
        region.members.append(index)
        region.spans.append(span)
        region.nbytes += nbytes

    def _place_regions(self) -> int:
        offset = 0
        copies = self.copies
        for region in self.regions:
            if region.nbytes >= DIRECT_IO_MIN_BYTES:  # page-aligned, so the writer can write it with O_DIRECT
                offset = _align(offset, DIRECT_IO_ALIGNMENT)
            region.offset = offset
            for index in region.members:
                src, in_region, nbytes = copies[index]
                copies[index] = (src, offset + in_region, nbytes)
            offset += _align(region.nbytes)
        return offset

    def signature(self) -> tuple | None:
        """Identity and version counter of every source tensor; None when a tensor has no version counter."""
        try:
            return tuple((ident, t._version) for ident, (t, _, _) in zip(self._idents, self.copies))
        except RuntimeError:  # inference-mode tensors track no version
            return None

    def staged_tensors(self, buffer: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The destination of every copy (views of their region's storage: shaped like the tensor, or its flat span
        for one with other strides, see ``views``) and each region's base tensor.

        ``buffer`` is a ``StagingBuffer``: each region becomes one storage of it (``buffer.tensor``), and the
        members of a run are carved from it in one ``split`` call rather than one view each.
        """
        staged: list[Any] = [None] * len(self.copies)
        bases = []
        info, strides = self.member_info, self.strides
        for region in self.regions:
            base = buffer.tensor(region.offset, region.nbytes, torch.uint8, (region.nbytes,)).view(region.dtype)
            bases.append(base)
            pieces = base.split(region.spans) if len(region.spans) > 1 else (base,)
            for index, piece in zip(region.members, pieces):
                shape = info[index][2]
                staged[index] = piece if len(shape) == 1 or strides[index] is not None else piece.view(shape)
        return staged, bases

    def views(self, staged: list[torch.Tensor]) -> list[torch.Tensor]:
        """The staged tensor of every copy, from ``staged_tensors``' destinations: each with its tensor's size and
        strides (a copied span viewed as the tensor viewed its storage; the others as they are)."""
        if not any(self.strides):
            return staged
        return [dst if stride is None else dst.as_strided(info[2], stride)
                for dst, stride, info in zip(staged, self.strides, self.member_info)]


class Scalars:
    """The 0-dim CPU tensors of a state dict, copied at stage time into one new storage per run group and dtype (one
    record and one checksum each, rather than one per scalar); other non-staged tensors are cloned one by one."""

    def __init__(self, plan: StagingPlan) -> None:
        self.groups = list(plan.scalars.values())  # leaf indices per dtype

    def copy(self, leaves: list) -> tuple[dict[int, tuple[torch.Tensor, int, int]], list[torch.Tensor]]:
        """``{leaf index: (0-dim copy, stack index, position in it)}`` and the stacked tensor (one storage) per
        run group and dtype."""
        out: dict[int, tuple[torch.Tensor, int, int]] = {}
        stacks = []
        with torch.no_grad():
            for stack_index, group in enumerate(self.groups):
                stacked = torch.stack([leaves[i] for i in group])
                stacks.append(stacked)
                for position, (leaf_index, view) in enumerate(zip(group, stacked.unbind())):
                    out[leaf_index] = (view, stack_index, position)
        return out, stacks


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # no Python-level behaviour: batched (stacked, foreach-copied)


def _contiguous_strides(shape: tuple) -> tuple:
    """The strides ``torch.empty(shape)`` has."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _split_keys(state_dict: Any) -> frozenset:
    """The top-level keys (as in key paths) whose value is a list or tuple: its items are run groups of their own."""
    if not isinstance(state_dict, dict):
        return frozenset()
    return frozenset(tree.json_key(k) for k, v in state_dict.items() if isinstance(v, (list, tuple)))


def _owned_small_tensors(leaves: list) -> dict[int, tuple[tuple, int]]:
    """The leaves that can be packed into a run without changing what ``torch.save`` would write, as
    ``{leaf index: ((storage address, dtype, shape), nbytes)}``: plain CPU tensors (no subclass, Python state,
    grad, conj or neg bit) smaller than ``SMALL_TENSOR_BYTES`` that cover their whole storage contiguously, where
    no other leaf views that storage differently (the very same view twice, a tied weight, stays one copy)."""
    first_view: dict[int, Any] = {}  # storage address -> the view of the first leaf on it
    shared: set[int] = set()
    candidates: dict[int, tuple[tuple, int]] = {}
    strided = torch.strided
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.layout != strided or leaf.device.type != "cpu":
            continue
        nbytes = leaf.nbytes
        offset = leaf.storage_offset()
        address = leaf.data_ptr() - offset * leaf.element_size()
        if (0 < nbytes < SMALL_TENSOR_BYTES and offset == 0 and leaf.is_contiguous() and pickles_as_view(leaf)
                and leaf.untyped_storage().nbytes() == nbytes and not leaf.is_quantized):
            view: Any = (address, leaf.dtype, tuple(leaf.shape))  # contiguous from 0: the shape says the rest
            candidates[i] = (view, nbytes)
        else:
            view = object()  # any other view of a candidate's storage (even an expanded one) shares it
        if first_view.setdefault(address, view) != view:
            shared.add(address)
    if not shared:
        return candidates
    return {i: c for i, c in candidates.items() if c[0][0] not in shared}


def unstaged_copy(leaf: Any) -> Any:
    """A leaf that is not staged, as it goes into the staged structure (tensors cloned, meta tensors as they are)."""
    if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
        return leaf.detach().clone()
    return leaf


# Leaves that cannot change after the save: a structure whose other leaves are all staging's own copies can be
# pickled later, off the training thread, and still give the bytes of the moment of the save.
_IMMUTABLE_LEAVES = frozenset({int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device})


def staged_tree(plan: StagingPlan, staged: list[torch.Tensor],
                bases: list[torch.Tensor]) -> tuple[tree.Tree, StorageLayout, bool]:
    """The staged state dict's ``Tree`` (staged tensors, 0-dim copies, clones, other leaves as they are), the
    ``StorageLayout`` its plain tensors are views of (the plan's regions and one storage per run group and dtype of
    0-dim copies), and whether every leaf is a copy of staging's own or an immutable value.

    ``staged``: ``plan.staged_tensors``' destinations, once the copy into them is complete or under way. A leaf
    that is not a plain tensor (``plan.special``) is staged as the same kind of tensor (``as_kind_of``), pickled by
    torch's own reduction as a synchronous write pickles the live one; one reached twice stays one object.
    """
    views = plan.views(staged)
    scalars, stacks = Scalars(plan).copy(plan.tree.leaves)
    members = dict(zip(map(id, views), plan.member_info))
    out = []
    all_owned = True
    for i, (leaf, copy_index) in enumerate(zip(plan.tree.leaves, plan.leaf_copy)):
        if copy_index >= 0:
            out.append(views[copy_index])
        elif i in scalars:
            scalar, stack_index, position = scalars[i]
            members[id(scalar)] = (len(bases) + stack_index, position, ())
            out.append(scalar)
        else:
            copied = unstaged_copy(leaf)
            if copied is leaf and type(leaf) not in _IMMUTABLE_LEAVES:
                all_owned = False
            out.append(copied)
    if plan.special:
        all_owned = _present_special(plan, scalars, members, out) and all_owned
    return plan.tree.with_leaves(out), StorageLayout(bases + stacks, members), all_owned


def _present_special(plan: StagingPlan, scalars: dict, members: dict, out: list) -> bool:
    """Replace in ``out`` each staged leaf of ``plan.special`` by its copy made the same kind of tensor (one object
    per leaf object, as ``torch.save`` keeps one reached twice), and drop from ``members`` what is no longer in
    ``out``; returns whether every such leaf is staging's own (not one with Python attributes: the caller's)."""
    presented: dict[int, torch.Tensor] = {}
    owned = True
    for i in sorted(plan.special):
        leaf, copy_index, staged = plan.tree.leaves[i], plan.leaf_copy[i], out[i]
        if copy_index < 0 and i not in scalars:
            raw = raw_view(leaf)
            staged = unstaged_copy(raw)
            if staged is raw:  # not copied (a meta tensor): written as it is
                out[i] = leaf
                continue
        if id(leaf) not in presented:
            presented[id(leaf)] = as_kind_of(staged, leaf)
            owned = owned and not torch._utils._get_obj_state(leaf)
        out[i] = presented[id(leaf)]
    placed = {id(x) for x in out}
    for key in [k for k in members if k not in placed]:  # a view no leaf is left with: its id may be reused
        del members[key]
    return owned


def pack_small_tensors(state_dict: Any) -> tuple[StorageLayout | None, tree.Tree]:
    """What a synchronous write pickles ``state_dict`` with: its owned small tensors copied into runs (one storage,
    record and checksum per run instead of one per tensor: a state of 100k small tensors writes in about half the
    time), every other tensor written from the caller's own memory. At most ``PACK_LIMIT_BYTES`` are copied.

    Returns:
        ``(layout, tree)`` for ``serialization.prepare(state_dict, layout=layout, tree=tree)``: the layout's
        members are the caller's own tensors, pickled as views of the runs (no layout when nothing is worth
        packing).
    """
    plan = StagingPlan(state_dict, owned_small_only=True, limit_bytes=PACK_LIMIT_BYTES)
    groups = list(plan.scalars.values())
    if len(plan.copies) + sum(map(len, groups)) < 2:  # nothing would share a record
        return None, plan.tree
    leaves, copies = plan.tree.leaves, plan.copies
    bases = []
    for region in plan.regions:  # one new storage per run, each member copied in (ctypes.memmove drops the GIL)
        base = torch.empty(region.nbytes, dtype=torch.uint8)
        address = base.data_ptr() - region.offset
        for index in region.members:
            src, offset, nbytes = copies[index]
            ctypes.memmove(address + offset, src.data_ptr(), nbytes)
        bases.append(base.view(region.dtype))
    members = {id(leaf): plan.member_info[c] for leaf, c in zip(leaves, plan.leaf_copy) if c >= 0}
    scalars, stacks = Scalars(plan).copy(leaves)  # the caller's 0-dim tensors pickle as views of the stacks
    members.update((id(leaves[i]), (len(bases) + stack_index, position, ()))
                   for i, (_, stack_index, position) in scalars.items())
    return StorageLayout(bases + stacks, members), plan.tree
