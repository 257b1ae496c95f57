"""A one-node SLURM cluster for the real-scheduler test (tests/test_slurm_cluster.py)."""
