"""``lucid selftest gpu``: the one-call acceptance run of the GPU path (see gpu.py)."""
