"""Let megatron-core (0.16.1) run on a machine without CUDA, under gloo.

Megatron-core's model code is device-agnostic except for a handful of calls into ``torch.cuda``.
On a machine where CUDA is unavailable each of those calls can only raise (or, for the lazy
seeding call, silently do nothing), so redirecting them to the CPU changes no behaviour that
worked before.  :func:`apply_cpu_shim` installs the redirections once, and only when
``torch.cuda.is_available()`` is False; on a GPU machine it does nothing.

This is the ONLY place in the project that patches another library.
"""

from __future__ import annotations

import torch

_applied = False


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    # Megatron's tracker reads "the CUDA generator" state; on CPU the device generator is
    # the default CPU generator.  (The keyword arguments mirror Megatron's signature.)
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def apply_cpu_shim() -> bool:
    """Install the CPU redirections if CUDA is unavailable. Returns whether they are active."""
    global _applied
    if torch.cuda.is_available():
        return False
    if _applied:
        return True
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

    _applied = True
    return True


def cpu_shim_active() -> bool:
    return _applied
