"""Experiments: the LUCID vs softmax reproduction and the mechanistic toy."""
