"""AdamW's state in a layout-free form, so that it survives a change of TP, DP or ZeRO stage.

DeepSpeed's own optimizer checkpoint stores each rank's flat ZeRO partition: it only loads back into the
same tensor-parallel x data-parallel x ZeRO layout.  Here every parameter's moments (``exp_avg``,
``exp_avg_sq``) and its fp32 master copy are saved as Megatron sharded tensors carrying the *parameter's*
sharding metadata (tensor-parallel axis, replica ids, the fused SwiGLU split), under ``optimizer/`` beside
``model/``.  Megatron's dist_checkpointing then reshards them exactly as it reshards the weights; on load
each value is scattered back into whatever partitions DeepSpeed holds now.

Cost: while saving, each rank holds its tensor-parallel slice of the model's moments and master weights
(12 bytes per local parameter) in host memory, gathered one parameter at a time from the ZeRO partitions.
The Adam step count (bias correction) is the same for every parameter and is stored as one integer.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "fp32_param"
STEP_KEY = "adam_step"


def gathered_parameters(engine):
    """ZeRO-3 keeps parameters partitioned: gather them (read-only) where full shapes or values are needed."""
    if engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """torch's AdamW under DeepSpeed's ZeRO wrapper (ZeRO 0 hands it over unwrapped)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _sharded_parameters(engine) -> list[tuple[str, torch.nn.Parameter, ShardedTensor | ShardedTensorFactory]]:
    """(state-dict name, parameter, its sharded-tensor description), each parameter once, in model order.

    Built with ZeRO-3's partitions gathered, so the descriptions carry full (tensor-parallel-local) shapes.
    """
    by_id = {id(p): p for p in engine.module.parameters() if p.requires_grad}
    found, seen = [], set()
    with gathered_parameters(engine):
        for name, sharded in engine.module.sharded_state_dict().items():
            param = by_id.get(id(getattr(sharded, "data", None)))
            if param is None or id(param) in seen:
                continue  # buffers, extra state, a tied weight's second name
            seen.add(id(param))
            found.append((name, param, sharded))
    return found


def _full_value(engine, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """The whole (tensor-parallel-local) fp32 tensor ``key`` of ``param``, assembled from the ZeRO partitions
    (collective under ZeRO 1/2/3: every rank calls this for every parameter in the same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if engine.zero_optimization_stage() == 0:  # no partitions: torch's own state, the weight is the master
        value = param.detach() if key == MASTER else _base_optimizer(engine).state[param][key]
    elif key == MASTER:
        value = safe_get_full_fp32_param(param)
    else:
        value = safe_get_full_optimizer_state(param, key)
    return value.detach().float().reshape(_full_shape(param)).cpu()


def _full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's (tensor-parallel-local) shape; ZeRO-3 keeps it in ``ds_shape`` while the data is partitioned."""
    return tuple(param.ds_shape if hasattr(param, "ds_shape") else param.shape)


def adam_steps(engine) -> int:
    """How many updates AdamW has made (its bias-correction count; 0 before the first step)."""
    counts = {int(state["step"]) for state in _base_optimizer(engine).state.values() if "step" in state}
    if len(counts) > 1:
        raise RuntimeError(f"AdamW's parameter groups disagree on the step count: {sorted(counts)}")
    return counts.pop() if counts else 0


def save_optimizer_state(engine, directory: Path) -> None:
    """Write the layout-free AdamW state of ``engine`` to ``directory`` (collective; the directory must exist)."""
    state: dict = {STEP_KEY: adam_steps(engine)}
    if state[STEP_KEY] > 0:  # before the first update there are no moments to keep
        _link_parameter_slices(engine)
        for name, param, sharded in _sharded_parameters(engine):
            for key in (*MOMENTS, MASTER):
                state[f"{key}/{name}"] = make_sharded_optimizer_tensor(sharded, _full_value(engine, param, key), key)
    dist_checkpointing.save(state, str(directory))


def load_optimizer_state(engine, directory: Path) -> int:
    """Load state written by ``save_optimizer_state`` at any layout into ``engine``'s current partitions.

    Returns the restored step count.  Call after the weights are loaded and the engine is built.
    """
    steps = int(dist_checkpointing.load_common_state_dict(str(directory))[STEP_KEY])
    if steps == 0:
        return 0
    params = _sharded_parameters(engine)
    template: dict = {}
    for name, param, sharded in params:
        for key in (*MOMENTS, MASTER):
            template[f"{key}/{name}"] = make_sharded_optimizer_tensor(
                sharded, torch.empty(_full_shape(param), dtype=torch.float32), key)
    loaded = dist_checkpointing.load(template, str(directory))
    _create_empty_adam_state(engine, steps)
    for name, param, _ in params:
        for key in (*MOMENTS, MASTER):
            _set_full_value(engine, param, key, loaded[f"{key}/{name}"])
    return steps


def _create_empty_adam_state(engine, steps: int) -> None:
    """torch's AdamW creates its state lazily at the first step: create it now (zeros, the given step count)
    over whatever tensors it optimizes (ZeRO's flat fp32 partitions, or the parameters), then let DeepSpeed
    link each parameter's slice of those partitions (what it would otherwise do inside its first step)."""
    base = _base_optimizer(engine)
    for p in _optimized_tensors(engine):
        state = base.state[p]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(steps), dtype=torch.float32)
    _link_parameter_slices(engine)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors AdamW's state is keyed by: ZeRO-3's flat fp32 sub-groups (it puts them into the optimizer's
    parameter groups only for the duration of its step), else the optimizer's parameters."""
    zero3_partitions = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3_partitions is not None:
        return list(zero3_partitions)
    return [p for group in _base_optimizer(engine).param_groups for p in group["params"]]


def _link_parameter_slices(engine) -> None:
    """Point each parameter's view into ZeRO 1/2's flat optimizer state at the current state tensors.

    DeepSpeed (0.19.8) links these views once, right after the first parameter group's first update, when
    the other groups' state does not exist yet: with two groups (decay / no decay) the second group's
    parameters end up with no views and its moments cannot be read.  Linking again is idempotent.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2 and bf16 only
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


def _set_full_value(engine, param: torch.nn.Parameter, key: str, value: torch.Tensor) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if engine.zero_optimization_stage() == 0:
        target = param.data if key == MASTER else _base_optimizer(engine).state[param][key]
        target.copy_(value.reshape(target.shape))
    elif key == MASTER:
        safe_set_full_fp32_param(param, value.to(param.device))
    else:
        safe_set_full_optimizer_state(param, value.to(param.device), key)
