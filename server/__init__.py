"""flexfed.server: the coordinator run by the consortium operator."""
