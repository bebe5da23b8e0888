"""ahf: ahf."""
