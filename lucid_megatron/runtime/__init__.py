"""The one place that decides placement and parallel layout: device, process groups, model, engine, batches.

The names below load on first use: ``lucid_megatron.runtime.process`` and ``.console`` must run before
Megatron and DeepSpeed are imported (they decide where those libraries' output goes), and importing this
package must not import them first.
"""

import importlib

_FROM_PLACEMENT = ("CollectiveTimeout", "PlacedMicroBatch", "Runtime", "default_device", "start_runtime",
                   "stop_runtime")

__all__ = list(_FROM_PLACEMENT)


def __getattr__(name):
    if name in _FROM_PLACEMENT:
        return getattr(importlib.import_module(".placement", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
