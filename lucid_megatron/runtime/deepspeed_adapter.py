"""Every use of DeepSpeed beyond its public training API (``initialize``, ``backward``, ``step``), in one place.

Checkpoints need what DeepSpeed does not document: where each parameter's fp32 master copy and Adam moments
live inside the ZeRO partitions, how torch's AdamW under ZeRO creates its state, and how ZeRO-3 keeps
parameters partitioned.  These were read from DeepSpeed ``TESTED_VERSIONS``; another version may rename or
re-layout any of them, and a resume would then fail, or worse, load wrong values.  So an engine is started
only on a tested version (``check_version``; ``train.allow_untested_deepspeed: true`` to try another) and
only if every internal it will need is present (``missing_internals``), and the test suite pins the same list
(tests/runtime/test_deepspeed_adapter.py): a DeepSpeed upgrade fails in CI, not in a user's resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import torch
import torch.distributed as dist

TESTED_VERSIONS = ("0.19.8",)
MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-tensor state
MASTER = "fp32_param"  # the fp32 master copy (the weight itself without ZeRO)


class UntestedDeepSpeed(RuntimeError):
    """DeepSpeed's version, or an internal this module relies on, is not the one it was written for."""


def check_version(allow_untested: bool = False) -> str:
    """DeepSpeed's version; raises ``UntestedDeepSpeed`` unless it is tested or ``allow_untested``."""
    import deepspeed

    version = deepspeed.__version__
    if version in TESTED_VERSIONS:
        return version
    message = (f"DeepSpeed {version} is installed; lucid_megatron reads DeepSpeed's ZeRO partitions and optimizer "
               f"state through internals checked on {', '.join(TESTED_VERSIONS)} only")
    if not allow_untested:
        raise UntestedDeepSpeed(f"{message}: install deepspeed=={TESTED_VERSIONS[-1]}, or set "
                                "train.allow_untested_deepspeed=true to try it (then check a resume by hand)")
    warnings.warn(f"{message}; going on because train.allow_untested_deepspeed is set", stacklevel=2)
    return version


# ---- what an engine must offer ----------------------------------------------------------------


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def base_optimizer(engine) -> torch.optim.Optimizer:
    """torch's AdamW under DeepSpeed's ZeRO wrapper (ZeRO 0 hands it over unwrapped)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def required_internals(engine) -> list[str]:
    """The attributes this module uses at ``engine``'s ZeRO stage, as ``owner.name`` (owners: the engine's
    ``optimizer``, every trainable ``parameter``, a parameter's ``fragment`` (ZeRO 1/2's ``_hp_mapping``) and
    ``partition`` (ZeRO-3's ``ds_tensor``), ZeRO-3's ``param_optimizer``): the start-up check and the pinning test."""
    stage = zero_stage(engine)
    if stage == 0:
        return []
    if stage in (1, 2):
        return ["optimizer.optimizer", "optimizer._lazy_init_hp_params_optimizer_state",
                "optimizer._hp_optimizer_states_linked", "parameter._hp_mapping", "fragment.lp_fragment_address",
                "fragment.hp_fragment", "fragment.get_optim_state_fragment"]
    return ["optimizer.optimizer", "optimizer.fp32_partitioned_groups_flat", "parameter.ds_tensor",
            "parameter.ds_shape", "parameter.ds_process_group", "parameter._z3_optimizer", "partition.ds_numel",
            "param_optimizer.get_local_fp32_param", "param_optimizer.set_local_hp_param"]


def missing_internals(engine) -> list[str]:
    """Which of ``required_internals`` the running DeepSpeed lacks (empty: all there)."""
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def owners(kind: str) -> list:
        if kind == "optimizer":
            return [engine.optimizer]
        if kind == "parameter":
            return params
        inner = {"fragment": "_hp_mapping", "partition": "ds_tensor", "param_optimizer": "_z3_optimizer"}[kind]
        return [getattr(p, inner) for p in params if getattr(p, inner, None) is not None]

    missing = []
    for item in required_internals(engine):
        kind, _, name = item.partition(".")
        found = owners(kind)
        if (kind != "parameter" and not found) or not all(hasattr(owner, name) for owner in found):
            missing.append(item)
    return missing


def check_engine(engine) -> None:
    """At start-up: every internal a checkpoint will need is there (else ``UntestedDeepSpeed``, naming them)."""
    import deepspeed

    missing = missing_internals(engine)
    if missing:
        raise UntestedDeepSpeed(f"DeepSpeed {deepspeed.__version__} at ZeRO stage {zero_stage(engine)} lacks "
                                f"{', '.join(missing)}, which checkpoints read; use deepspeed=="
                                f"{TESTED_VERSIONS[-1]}")


# ---- parameters -------------------------------------------------------------------------------


def gathered_parameters(engine):
    """ZeRO-3 keeps parameters partitioned: gather them (read-only) where full shapes or values are needed."""
    if engine is not None and zero_stage(engine) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def full_shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's (tensor-parallel-local) shape; ZeRO-3 keeps it in ``ds_shape`` while the data is partitioned."""
    return tuple(param.ds_shape if hasattr(param, "ds_shape") else param.shape)


def local_weights(engine) -> list[torch.Tensor]:
    """The weight values this rank holds (under ZeRO-3, its partitions only)."""
    stage3 = zero_stage(engine) == 3
    return [p.ds_tensor if stage3 else p for p in engine.module.parameters() if not stage3 or hasattr(p, "ds_tensor")]


# ---- this rank's piece of each parameter's optimizer state --------------------------------------


@dataclasses.dataclass(frozen=True)
class Fragment:
    """The elements ``[start, start + numel)`` of a flattened (tensor-parallel-local) parameter whose fp32 master
    copy and Adam moments this rank holds: its ZeRO partition's share of the parameter (all of it without ZeRO)."""

    start: int
    numel: int


def local_fragment(engine, param: torch.nn.Parameter) -> Fragment | None:
    """This rank's fragment of ``param`` (None: its ZeRO partition holds none of it)."""
    stage, total = zero_stage(engine), math.prod(full_shape(param))
    if stage == 0:
        return Fragment(0, total)
    if stage in (1, 2):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None
        address = mapping.lp_fragment_address
        return Fragment(int(address.start), int(address.numel)) if address.numel else None
    size = int(param.ds_tensor.ds_numel)  # ZeRO-3: equal partitions of the flattened parameter, the last padded
    start = dist.get_rank(group=param.ds_process_group) * size
    return Fragment(start, min(size, total - start)) if start < total else None


def local_values(engine, param: torch.nn.Parameter, key: str, fragment: Fragment) -> torch.Tensor:
    """The fp32 tensor ``key`` (a moment or ``MASTER``) of this rank's fragment of ``param``, flat, on the
    parameter's device: a view of the live state where DeepSpeed keeps one (copy it before it changes)."""
    stage = zero_stage(engine)
    if stage == 0:
        value = param.detach() if key == MASTER else base_optimizer(engine).state[param][key]
        return value.reshape(-1)
    if stage in (1, 2):
        mapping = param._hp_mapping
        return mapping.hp_fragment if key == MASTER else mapping.get_optim_state_fragment(key)
    state = param._z3_optimizer.get_local_fp32_param(param, None if key == MASTER else key)
    return state.reshape(-1)[:fragment.numel]


@torch.no_grad()
def set_local_values(engine, param: torch.nn.Parameter, key: str, fragment: Fragment, value: torch.Tensor) -> None:
    """Write ``value`` (flat fp32, ``fragment.numel`` elements) into this rank's fragment of ``key``."""
    stage = zero_stage(engine)
    if stage == 0:
        target = param.data if key == MASTER else base_optimizer(engine).state[param][key]
        target.view(-1).copy_(value)
    elif stage in (1, 2):
        local_values(engine, param, key, fragment).copy_(value)
    else:
        padded = torch.zeros(int(param.ds_tensor.ds_numel), dtype=torch.float32, device=value.device)
        padded[:fragment.numel] = value
        param._z3_optimizer.set_local_hp_param(padded.to(param.ds_tensor.device), param,
                                               None if key == MASTER else key)


# ---- AdamW state ------------------------------------------------------------------------------


def adam_steps(engine) -> int:
    """How many updates AdamW has made (its bias-correction count; 0 before the first step)."""
    counts = {int(state["step"]) for state in base_optimizer(engine).state.values() if "step" in state}
    if len(counts) > 1:
        raise RuntimeError(f"AdamW's parameter groups disagree on the step count: {sorted(counts)}")
    return counts.pop() if counts else 0


def create_empty_adam_state(engine, steps: int) -> None:
    """torch's AdamW creates its state lazily at the first step: create it now (zeros, the given step count)
    over whatever tensors it optimizes, then let DeepSpeed link each parameter's slice of those tensors (what
    it would otherwise do inside its first step)."""
    base = base_optimizer(engine)
    for p in _optimized_tensors(engine):
        state = base.state[p]
        for key in MOMENTS:
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(steps), dtype=torch.float32)
    link_parameter_slices(engine)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors AdamW's state is keyed by: ZeRO-3's flat fp32 sub-groups (it puts them into the optimizer's
    parameter groups only for the duration of its step), else the optimizer's parameters (ZeRO 1/2: the flat
    fp32 partitions; ZeRO 0: the weights)."""
    zero3_partitions = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    if zero3_partitions is not None:
        return list(zero3_partitions)
    return [p for group in base_optimizer(engine).param_groups for p in group["params"]]


def link_parameter_slices(engine) -> None:
    """Point each parameter's view into ZeRO 1/2's flat optimizer state at the current state tensors.

    DeepSpeed 0.19.8 links these views once, right after the first parameter group's first update, when the
    other groups' state does not exist yet: with two groups (decay / no decay) the second group's parameters
    end up with no views and their moments cannot be read.  Linking again is idempotent.
    """
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO 1/2 and bf16 only
    if link is not None:
        engine.optimizer._hp_optimizer_states_linked = False
        link()


# ---- checkpoints written before the single optimizer format -----------------------------------

# The only classes DeepSpeed's own state files may name (its loader unpickles them without restriction):
# checked before DeepSpeed reads a file, so a crafted file is refused instead of executed.
LEGACY_PICKLE_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def load_legacy_state(engine, directory) -> None:
    """DeepSpeed's own per-rank optimizer files (``deepspeed/`` of a checkpoint written before ``optimizer/``
    was the only optimizer state), on the layout they were saved with."""
    engine.load_checkpoint(str(directory), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False,
                           load_module_strict=True)
