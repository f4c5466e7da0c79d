"""A happens-before checker for Triton kernels run by the interpreter.

The interpreter runs a grid's programs one after another, so a kernel whose cross-program waits are missing
still computes the right numbers there: numerical tests cannot see a missing wait.  This checker watches
every load, store and atomic of every program (by hooking the interpreter's builder) and keeps a vector clock
per program, as a data-race detector does:

* an atomic with *release* semantics publishes the program's clock on that address;
* an atomic with *acquire* semantics joins the clock published there (acq_rel does both, relaxed neither);
* a plain load of an element that another program stored in the same launch is a **race** unless the
  reader's clock has seen that store, i.e. a chain of release -> acquire orders the store before the load.

So it checks the protocol the GPU relies on, whatever order the programs actually ran in.  Kernel launches
are ordered by the stream, so state is reset at each launch.  It models programs as single threads: the
barriers that order a program's own threads around its atomics (``tiles.publish``/``wait_published``) are not
checked here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import triton.runtime.interpreter as interp
from triton._C.libtriton import ir


@dataclass
class Race:
    reader: tuple
    writer: tuple
    address: int


@dataclass
class _State:
    clocks: dict = field(default_factory=dict)  # program -> {program: epoch seen}
    epoch: dict = field(default_factory=dict)  # program -> current epoch
    published: dict = field(default_factory=dict)  # address -> clock released there
    writer: dict = field(default_factory=dict)  # address -> (program, epoch) of its last plain store


class HappensBefore:
    def __init__(self):
        self.races: list[Race] = []
        self.launches = 0
        self.plain_loads_checked = 0
        self.acquires = 0
        self._state = _State()

    # -- vector clocks ----------------------------------------------------------------------------------
    def _program(self):
        return interp.interpreter_builder.grid_idx

    def _clock(self, p):
        clock = self._state.clocks.setdefault(p, {})
        clock.setdefault(p, self._state.epoch.setdefault(p, 1))
        return clock

    def _acquire(self, p, address):
        self.acquires += 1
        for q, e in self._state.published.get(address, {}).items():
            clock = self._clock(p)
            clock[q] = max(clock.get(q, 0), e)

    def _release(self, p, address):
        clock = dict(self._clock(p))
        merged = self._state.published.setdefault(address, {})
        for q, e in clock.items():
            merged[q] = max(merged.get(q, 0), e)
        self._state.epoch[p] += 1
        self._clock(p)[p] = self._state.epoch[p]

    @staticmethod
    def _addresses(ptrs, mask):
        data = np.asarray(ptrs.data).reshape(-1)
        if mask is None:
            return data
        return data[np.asarray(mask.data, dtype=bool).reshape(-1)]

    # -- hooks -------------------------------------------------------------------------------------------
    def on_load(self, ptrs, mask):
        p = self._program()
        clock = self._clock(p)
        for a in self._addresses(ptrs, mask).tolist():
            self.plain_loads_checked += 1
            w = self._state.writer.get(a)
            if w is not None and w[0] != p and clock.get(w[0], 0) < w[1]:
                self.races.append(Race(p, w[0], a))

    def on_store(self, ptrs, mask):
        p = self._program()
        epoch = self._clock(p)[p]
        for a in self._addresses(ptrs, mask).tolist():
            self._state.writer[a] = (p, epoch)

    def on_atomic(self, ptr, mask, sem):
        p = self._program()
        for a in self._addresses(ptr, mask).tolist():
            if sem in (ir.MEM_SEMANTIC.ACQUIRE, ir.MEM_SEMANTIC.ACQUIRE_RELEASE):
                self._acquire(p, a)
            if sem in (ir.MEM_SEMANTIC.RELEASE, ir.MEM_SEMANTIC.ACQUIRE_RELEASE):
                self._release(p, a)

    def on_launch(self):
        self.launches += 1
        self._state = _State()


@contextlib.contextmanager
def watch():
    """Record every interpreted launch inside the block; yields the checker."""
    checker = HappensBefore()
    builder = interp.InterpreterBuilder
    originals = {name: getattr(builder, name) for name in
                 ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")}
    launch = interp.GridExecutor.__call__

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        checker.on_load(ptrs, mask)
        return originals["create_masked_load"](self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        checker.on_store(ptrs, mask)
        return originals["create_masked_store"](self, ptrs, value, mask, cache_policy)

    def atomic_rmw(self, op, ptr, val, mask, sem, scope):
        result = originals["create_atomic_rmw"](self, op, ptr, val, mask, sem, scope)
        checker.on_atomic(ptr, mask, sem)
        return result

    def atomic_cas(self, ptr, cmp, val, sem, scope):
        result = originals["create_atomic_cas"](self, ptr, cmp, val, sem, scope)
        checker.on_atomic(ptr, None, sem)
        return result

    def counted_launch(self, *args, **kwargs):
        checker.on_launch()
        return launch(self, *args, **kwargs)

    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    interp.GridExecutor.__call__ = counted_launch
    try:
        yield checker
    finally:
        for name, fn in originals.items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = launch
