"""The parts of ``lucid selftest gpu``: each checks one thing and returns a result that renders its own table.

``base.py`` holds what they share (the status, the result, the context); ``selftest/gpu.py`` runs them in order.
"""
