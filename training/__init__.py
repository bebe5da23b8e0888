"""ahf: training."""
