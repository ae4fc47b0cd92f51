"""Cluster launch helpers: TF_CONFIG from SLURM variables, a local multi-worker launcher, sbatch scripts."""
