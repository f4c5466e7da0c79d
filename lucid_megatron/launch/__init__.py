"""Starting training jobs: torchrun on this machine, sbatch scripts for SLURM clusters."""
