"""Megatron-Core glue: LUCID core attention, layer specs, norms, the GPT builder."""
