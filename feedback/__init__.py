"""ahf: feedback."""
