"""The one place that decides placement and parallel layout: device, process groups, model, engine, batches."""

from .placement import CollectiveTimeout, Runtime, default_device, start_runtime, stop_runtime

__all__ = ["CollectiveTimeout", "Runtime", "default_device", "start_runtime", "stop_runtime"]
