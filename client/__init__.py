"""flexfed.client: what a data owner runs behind its firewall."""
