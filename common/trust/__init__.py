"""The trust stack: PKI and CA, bundle signing and provenance, owner requests, the log's events,
releases and audits.
"""
