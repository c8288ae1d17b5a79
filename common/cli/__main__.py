"""``python -m flexfed.common.cli`` (used to run owners in their own process)."""

from flexfed.common.cli import main

main()
