"""The client side of the Consortium API, shared by owners, the operator and auditors: TLS, calls,
transfers, the served log.
"""
