"""AdamW's state, saved once, by the rank that holds it, in a form any layout can load.

Under ZeRO each data-parallel rank holds the fp32 master copy and both Adam moments of a contiguous piece (a
*fragment*) of each flattened parameter.  Each rank writes exactly its fragments: a fragment, a run of
elements in row-major order, is a union of at most a few boxes of the parameter, and each box is saved as a
Megatron ``ShardedTensor`` of the *parameter's* global tensor (tensor-parallel offset, layer axis and the fused
SwiGLU split included) under key ``{exp_avg|exp_avg_sq|fp32_param}.{parameter key}``, with an uneven sharding
grid.  Nothing is gathered and nothing is written twice.  On load, torch's distributed checkpoint reads each
box of the new layout's fragments from whichever saved boxes overlap it: DP, TP and ZeRO stage may all change.

Checkpoints written before this format saved each parameter's whole tensor-parallel-local state under the
same keys and global shapes (one box per parameter, from data-parallel rank 0); they load the same way.
The Adam step count (bias correction) is the same for every parameter and is stored as one integer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
# Megatron is imported where it is used (see store.py: the `lucid train` launcher imports this package).
if TYPE_CHECKING:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from lucid_megatron.runtime import deepspeed_adapter as ds

STATE_KEYS = (*ds.MOMENTS, ds.MASTER)
STEP_KEY = "adam_step"


@dataclasses.dataclass(frozen=True)
class Box:
    """One box of a fragment: elements ``[begin, end)`` of the fragment are the box ``shape`` at ``offset`` (in the
    coordinates of ``target``, one tensor of the parameter's sharded description)."""

    target: ShardedTensor
    offset: tuple[int, ...]
    shape: tuple[int, ...]
    begin: int
    end: int

    def sharded(self, prefix: str, data: torch.Tensor) -> ShardedTensor:
        """The box of ``data`` (``shape`` elements) as a sharded tensor of the parameter's global tensor.  Axes
        Megatron prepends (the layer index) become axes of size 1 of the box: Megatron's uneven-sharding path
        leaves them out of a chunk's sizes but not of its offsets."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        t = self.target
        p = t.prepend_axis_num
        offset = (*t.global_offset[:p], *(o + d for o, d in zip(t.global_offset[p:], self.offset)))
        shape = (*(1,) * p, *self.shape)
        return ShardedTensor(key=f"{prefix}.{t.key}", data=data.view(shape), dtype=data.dtype, local_shape=shape,
                             global_shape=t.global_shape, global_offset=offset, axis_fragmentations=None,
                             replica_id=t.replica_id, prepend_axis_num=0)


def _boxes_of_range(shape: tuple[int, ...], begin: int, end: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Split the row-major elements ``[begin, end)`` of a tensor of ``shape`` into boxes, in order:
    ``(offset, box shape)``.  A run of whole sub-tensors along the first axis is one box; the partial ones at
    either end are split further along the next axes."""
    if begin >= end:
        return
    if len(shape) <= 1:
        yield (begin,), (end - begin,)
        return
    inner = math.prod(shape[1:])
    first, last = -(-begin // inner), end // inner  # whole sub-tensors first..last-1
    if first > last:  # inside one sub-tensor
        row = begin // inner
        for offset, box in _boxes_of_range(shape[1:], begin - row * inner, end - row * inner):
            yield (row, *offset), (1, *box)
        return
    if begin < first * inner:
        row = first - 1
        for offset, box in _boxes_of_range(shape[1:], begin - row * inner, inner):
            yield (row, *offset), (1, *box)
    if first < last:
        yield (first, *(0,) * (len(shape) - 1)), (last - first, *shape[1:])
    if last * inner < end:
        for offset, box in _boxes_of_range(shape[1:], 0, end - last * inner):
            yield (last, *offset), (1, *box)


def _targets(sharded: ShardedTensor | ShardedTensorFactory, shape: tuple[int, ...]) -> list[tuple[ShardedTensor, int]]:
    """The tensors the parameter is saved as, each with the flat index in the parameter of its first element.

    A factory (the fused SwiGLU weight: two halves along the first axis, each its own global tensor) is built on
    a tensor of row indices broadcast over the other axes (no memory), which shows which rows each piece holds;
    a piece must be a run of whole rows."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if isinstance(sharded, ShardedTensor):
        return [(dataclasses.replace(sharded, data=None, dtype=torch.float32), 0)]
    rows = torch.arange(shape[0]).view(-1, *(1,) * (len(shape) - 1)).expand(shape)
    built = dataclasses.replace(sharded, data=rows).build()
    pieces = list(built.values()) if isinstance(built, dict) else list(built)
    targets, row_size = [], math.prod(shape[1:])
    for piece in pieces:
        first_rows = piece.data.reshape(piece.data.shape[0], -1)[:, 0]
        start = int(first_rows[0]) if first_rows.numel() else 0
        if tuple(piece.data.shape[1:]) != tuple(shape[1:]) or not torch.equal(
                first_rows, torch.arange(start, start + first_rows.numel())):
            raise NotImplementedError(f"{sharded.key}: a sharded-tensor factory piece that is not a run of whole rows "
                                      "of the parameter cannot be saved by fragment")
        targets.append((dataclasses.replace(piece, data=None, dtype=torch.float32), start * row_size))
    return targets


def _fragment_replica(replica_id, partitioned: bool):
    """A ZeRO fragment is this data-parallel rank's own (the last component of Megatron's replica id counts
    data-parallel replicas); without ZeRO every data-parallel rank holds the same state and rank 0's is written."""
    if not partitioned:
        return replica_id
    return (*replica_id[:-1], 0) if isinstance(replica_id, tuple) else 0


def fragment_boxes(sharded, shape: tuple[int, ...], fragment: ds.Fragment, partitioned: bool = True) -> list[Box]:
    """The boxes that tile this rank's ``fragment`` of a parameter of ``shape`` described by ``sharded``
    (``partitioned``: the fragment is this data-parallel rank's ZeRO partition, not a replica)."""
    low, high = fragment.start, fragment.start + fragment.numel
    boxes = []
    for target, first in _targets(sharded, shape):
        target = dataclasses.replace(target, replica_id=_fragment_replica(target.replica_id, partitioned))
        count = math.prod(target.local_shape)
        begin, end = max(low, first), min(high, first + count)
        if begin >= end:
            continue
        position = begin - low
        for offset, box in _boxes_of_range(tuple(target.local_shape), begin - first, end - first):
            size = math.prod(box)
            boxes.append(Box(target, offset, box, position, position + size))
            position += size
    return boxes


def _sharded_parameters(engine) -> list[tuple[str, torch.nn.Parameter, ShardedTensor | ShardedTensorFactory]]:
    """(state-dict name, parameter, its sharded-tensor description), each parameter once, in model order.

    Built with ZeRO-3's partitions gathered, so the descriptions carry full (tensor-parallel-local) shapes.
    """
    by_id = {id(p): p for p in engine.module.parameters() if p.requires_grad}
    found, seen = [], set()
    with ds.gathered_parameters(engine):
        for name, sharded in engine.module.sharded_state_dict().items():
            param = by_id.get(id(getattr(sharded, "data", None)))
            if param is None or id(param) in seen:
                continue  # buffers, extra state, a tied weight's second name
            seen.add(id(param))
            found.append((name, param, sharded))
    return found


def _fragments(engine) -> Iterator[tuple[str, torch.nn.Parameter, ds.Fragment, list[Box]]]:
    """This rank's fragments, each with the boxes that tile it (parameters it holds nothing of are left out)."""
    for name, param, sharded in _sharded_parameters(engine):
        fragment = ds.local_fragment(engine, param)
        if fragment is not None and fragment.numel:
            yield name, param, fragment, fragment_boxes(sharded, ds.full_shape(param), fragment,
                                                        partitioned=ds.zero_stage(engine) > 0)


def optimizer_sharded_state(engine) -> dict:
    """This rank's AdamW state as a Megatron sharded state dict: every box of every fragment, for each of the
    moments and the master copy (views of the live state on its device; the save copies them to the host)."""
    state: dict = {STEP_KEY: ds.adam_steps(engine)}
    if state[STEP_KEY] == 0:  # before the first update there are no moments to keep
        return state
    ds.link_parameter_slices(engine)
    for name, param, fragment, boxes in _fragments(engine):
        for key in STATE_KEYS:
            values = ds.local_values(engine, param, key, fragment).detach()
            for i, box in enumerate(boxes):
                data = values[box.begin:box.end].view(box.shape)
                data = data.float() if data.dtype != torch.float32 else own_storage(data)
                state[f"{key}/{name}/{i}"] = box.sharded(key, data)
    return state


def own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A host tensor over exactly the memory of ``tensor`` (no copy).

    Megatron's writer copies a host tensor that is a view into a larger storage (else torch would write the
    whole storage): the fp32 fragments and ZeRO's flattened weights all are, so a save would first copy the
    whole state in the training process.  Over exactly its own bytes, a tensor is written as it is; a
    background writer, forked, sees the memory as it was at the fork.  Device tensors are left alone (they are
    copied to the host before the fork anyway)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or \
            tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(tensor.element_size())
    if as_int is None or tensor.dtype.is_complex:
        return tensor
    flat = tensor.detach()
    array = flat.view(as_int).numpy() if flat.dtype != as_int else flat.numpy()
    return torch.from_numpy(array).view(tensor.dtype)


def save_optimizer_state(engine, directory: Path, *, async_save: bool = False):
    """Write this rank's AdamW fragments to ``directory`` (collective; the directory must exist).

    ``async_save``: return Megatron's AsyncRequest for the writing instead of writing now."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.save(optimizer_sharded_state(engine), str(directory), async_sharded_save=async_save)


def load_optimizer_state(engine, directory: Path) -> int:
    """Load AdamW state written at any layout (or by the earlier whole-tensor format) into ``engine``'s current
    fragments.  Returns the restored step count.  Call after the weights are loaded and the engine is built."""
    from megatron.core import dist_checkpointing

    steps = int(dist_checkpointing.load_common_state_dict(str(directory))[STEP_KEY])
    if steps == 0:
        return 0
    ds.create_empty_adam_state(engine, steps)
    fragments = list(_fragments(engine))
    template: dict = {}
    for name, param, fragment, boxes in fragments:
        for key in STATE_KEYS:
            for i, box in enumerate(boxes):
                template[f"{key}/{name}/{i}"] = box.sharded(key, torch.empty(box.shape, dtype=torch.float32))
    loaded = dist_checkpointing.load(template, str(directory)) if template else {}
    for name, param, fragment, boxes in fragments:
        for key in STATE_KEYS:
            flat = torch.empty(fragment.numel, dtype=torch.float32)
            for i, box in enumerate(boxes):
                flat[box.begin:box.end] = loaded[f"{key}/{name}/{i}"].reshape(-1)
            ds.set_local_values(engine, param, key, fragment, flat)
    return steps
