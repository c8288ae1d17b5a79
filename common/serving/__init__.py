"""Serving an assembled model with per-request expert sets (inference-time opt-in/opt-out).

``policy`` turns a request's expert restrictions (orgs, license classes) into the slots to
drop; ``generation`` runs a loaded model with those slots masked, which computes exactly what
``flexfed optout`` would have written; ``app`` is the OpenAI-compatible HTTP front.
"""
