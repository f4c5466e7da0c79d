"""Checkpoint conversion: Megatron <-> Hugging Face (LUCID), Hugging Face Llama -> LUCID, parity checks."""
