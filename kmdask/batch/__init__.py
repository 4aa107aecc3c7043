"""Batch jobs: job specs, cluster profiles, the one module that connects to a cluster, fit kinds,
checkpoints, the runner and its run directories, and batch submission."""
