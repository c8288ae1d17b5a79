"""Names every artifact and certificate shares: the org (and expert name) rule, torch-free.

The CA checks a member's org against it when issuing (:mod:`flexfed.common.trust.keys`), and
expert.json's org and name must match it (:mod:`flexfed.common.formats.bundle`): the verifier
compares the certificate's org and expert.json's byte for byte.
"""

from __future__ import annotations

import re

# FIX (issue 12): a released model keeps each slot's files under "<org>--<name>", and orgs
# and names could hold "--": acme + labs--x and acme--labs + x named the same folder, and one
# member could block every release. Without "--" inside either part the folder names one
# slot (a name starts with a letter or digit, so the separator is the last "--").
ORG_PATTERN = re.compile(r"(?!.*--)[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, no '--'"
