"""The one place that decides placement and parallel layout: device, process groups, model, engine, batches."""

from .placement import Runtime, default_device, start_runtime, stop_runtime

__all__ = ["Runtime", "default_device", "start_runtime", "stop_runtime"]
