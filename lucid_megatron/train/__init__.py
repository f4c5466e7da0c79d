"""The pretraining driver: DeepSpeed engine, training loop, checkpoints, metrics, preemption."""
