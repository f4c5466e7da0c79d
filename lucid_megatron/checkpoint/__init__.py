"""Checkpoints: the atomic, reshardable training checkpoint (``Checkpointer``), weights-only checkpoints,
resolving a run directory or step to a checkpoint, holding it against rotation while it is read (``reading``),
reading what a checkpoint records (``state.json``, ``model.yaml``), and checking a checkpoint before anything
unpickles it.  Used by train, convert and eval."""

from .store import (
    DEEPSPEED_PICKLE_GLOBALS,
    Checkpointer,
    RngStreams,
    Stateful,
    checkpoint_problem,
    nonfinite_weights,
    pickle_globals,
    read_model_config,
    read_state,
    reading,
    resolve_checkpoint,
    save_weights_checkpoint,
    unsafe_model_index,
)

__all__ = ["DEEPSPEED_PICKLE_GLOBALS", "Checkpointer", "RngStreams", "Stateful", "checkpoint_problem",
           "nonfinite_weights", "pickle_globals", "read_model_config", "read_state", "reading", "resolve_checkpoint",
           "save_weights_checkpoint", "unsafe_model_index"]
