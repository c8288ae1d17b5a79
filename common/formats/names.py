"""Names every artifact and certificate shares: the org (and expert name) rule, torch-free.

The CA checks a member's org against it when issuing (:mod:`flexfed.common.trust.keys`), and
expert.json's org and name must match it (:mod:`flexfed.common.formats.bundle`): the verifier
compares the certificate's org and expert.json's byte for byte.
"""

from __future__ import annotations

import re

ORG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
