"""The demos, which play every party (operator, owners, auditor) on one machine."""
