"""Let megatron-core (0.16.1) and DeepSpeed run on a machine without CUDA, under gloo.

Megatron-core's model code is device-agnostic except for a handful of calls into ``torch.cuda``.
On a machine where CUDA is unavailable each of those calls can only raise (or, for the lazy
seeding call, silently do nothing), so redirecting them to the CPU (patches 1-4, and 6: a function whose
only CUDA part is how it builds an index) changes no behaviour that worked before.  DeepSpeed's CPU
accelerator would compile a C++ op that training never uses in every process that starts an engine; patch 5 marks it unavailable (the CUDA accelerator has no such op,
so there is nothing to skip on a GPU machine).  :func:`apply_cpu_shim` installs the patches once, and
only when ``torch.cuda.is_available()`` is False; on a GPU machine it does nothing.  Patch 5 needs
DeepSpeed imported, so only callers about to start an engine ask for it (``deepspeed=True``): model
building, evaluation and conversion never load DeepSpeed for it.

This is the ONLY place in the project that patches another library.
"""

from __future__ import annotations

import torch

_applied: set[str] = set()  # patch groups installed in this process: "megatron_core", "deepspeed"


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    # Megatron's tracker reads "the CUDA generator" state; on CPU the device generator is
    # the default CPU generator.  (The keyword arguments mirror Megatron's signature.)
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Chunks ``rank`` and ``2 * size - 1 - rank`` of ``2 * size`` along ``seq_dim`` (Megatron's zigzag split)."""
    size, rank = cp_group.size(), cp_group.rank()
    chunks = pos_emb.chunk(2 * size, dim=seq_dim)
    return torch.cat([chunks[rank], chunks[2 * size - 1 - rank]], dim=seq_dim)


def _patch_megatron_core() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # 1. RNG tracker (CudaRNGStatesTracker.fork, used by model_parallel_cuda_manual_seed and the
    #    dropout forks): it saves/restores the device generator through these two helpers, which
    #    index torch.cuda.default_generators.  Point them at the CPU generator.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    # 2. CudaRNGStatesTracker.add captures a freshly seeded state with torch.cuda.get_rng_state()
    #    after torch.cuda.manual_seed(seed).  Without CUDA, manual_seed is queued and never runs and
    #    get_rng_state raises; seed and read the CPU generator instead (add() restores the previous
    #    state afterwards, so the default stream is untouched).  model_parallel_cuda_manual_seed also
    #    seeds "the device generator" with the data-parallel seed: on CPU that is the CPU generator.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed) and None

    # 3. torch.cuda.current_device() is used as the `device=` of new tensors: rotary inv_freq, the
    #    global memory buffer of the attention/TP code, and the gather/reduce-scatter buffers of
    #    tensor and sequence parallelism.  Return the CPU device so those tensors land on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # 4. dist_checkpointing's async writer calls torch.cuda.synchronize() around writes; there is
    #    no device stream to wait for on CPU.
    torch.cuda.synchronize = lambda device=None: None

    # 6. get_pos_emb_on_this_cp_rank (a RoPE table cut to this CP rank's two zigzag chunks) builds its
    #    chunk index in pinned memory and copies it to the GPU; YaRN's embedding calls it when built,
    #    for its cos/sin cache.  The same two chunks, taken without the index (every module that imported
    #    the function by name gets this one).
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding

    for module in (rope_utils, rotary_pos_embedding, yarn_rotary_pos_embedding):
        module.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank


def _patch_deepspeed() -> None:
    import deepspeed.ops

    # 5. DeepSpeed's communication backend builds its shared-memory all-reduce op
    #    (deepspeed_shm_comm) when an engine starts on the CPU accelerator, in every process: minutes
    #    of C++ compilation on first use, into a cache every environment shares (so two environments
    #    rebuild it in turn), and prints "built successfully".  Only the inference all-reduce (kernel
    #    injection) uses it; training collectives go through torch.distributed (gloo) either way.
    #    DeepSpeed consults its op table before building, so marking the op incompatible there skips
    #    the build and the shared memory.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def apply_cpu_shim(*, deepspeed: bool = False) -> bool:
    """Install the CPU patches if CUDA is unavailable. Returns whether they are active.

    ``deepspeed=True`` also installs patch 5 (for a caller about to start a DeepSpeed engine). Idempotent.
    """
    if torch.cuda.is_available():
        return False
    if "megatron_core" not in _applied:
        _patch_megatron_core()
        _applied.add("megatron_core")
    if deepspeed and "deepspeed" not in _applied:
        _patch_deepspeed()
        _applied.add("deepspeed")
    return True


def cpu_shim_active() -> bool:
    return "megatron_core" in _applied
