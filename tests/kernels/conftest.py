"""The interpreter setting for these tests lives in tests/conftest.py: it must precede Triton's first import."""
