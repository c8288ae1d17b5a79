"""flexfed.common: model families, the FlexOlmo MoE math, artifact formats and validation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("flexfed")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
