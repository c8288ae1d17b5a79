"""The operator's commands: ``flexfed coordinator``, ``ca``, ``release``, ``anchor``."""
