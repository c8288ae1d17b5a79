"""A generic append-only Merkle log (RFC 9162) with signed checkpoints; it knows no flexfed event
types.
"""
