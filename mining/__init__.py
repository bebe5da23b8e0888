"""ahf: mining."""
