"""ahf: index."""
