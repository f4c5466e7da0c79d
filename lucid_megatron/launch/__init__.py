"""Starting training jobs on SLURM clusters: sbatch scripts, status, cancel (one machine: ``lucid train``)."""
