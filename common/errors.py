"""The one error hierarchy of flexfed.

Every error a user can cause derives from :class:`FlexfedError` and carries an exit code, so
the CLI can print one clear line and exit with a code that says which family failed. Errors
also inherit the matching builtin where that helps callers (``FileNotFoundError``,
``ValueError``), but tampering and bad signatures are *never* plain ``ValueError``s: they are
:class:`VerificationError`, which callers cannot mistake for a bad argument.
"""

from __future__ import annotations


class FlexfedError(Exception):
    """Base of every error flexfed raises on purpose."""

    exit_code: int = 1


# --- configuration -------------------------------------------------------------------------


class ConfigError(FlexfedError):
    """A setting, flag or configuration file is wrong."""

    exit_code = 2


class UnsupportedModelError(ConfigError):
    """The model directory is not of a supported family, or uses an unsupported feature."""


class DeviceError(ConfigError):
    """The requested compute device is not available."""


# --- input validation ----------------------------------------------------------------------


class InvalidInputError(FlexfedError, ValueError):
    """Something the user or another party supplied is malformed."""

    exit_code = 3


class MissingFileError(InvalidInputError, FileNotFoundError):
    """A required file is missing."""


class SafetensorsFormatError(InvalidInputError):
    """A safetensors file is malformed (header, offsets, dtypes, truncation)."""


class BundleError(InvalidInputError):
    """An expert bundle does not match its format or its anchor."""


class MetadataError(BundleError):
    """A JSON metadata file (expert.json, anchor.json, assembly.json) is malformed."""


class TensorMismatchError(BundleError):
    """Tensors are missing, unexpected, or of the wrong shape or dtype."""


class NonFiniteTensorError(BundleError):
    """A tensor holds NaN or infinite values."""


class AnchorMismatchError(BundleError):
    """An artifact was made for a different anchor or model family."""


class DataError(InvalidInputError):
    """Training or evaluation data is empty, unreadable or of an unknown format."""


# --- verification (tampering, signatures, provenance) ------------------------------------


class VerificationError(FlexfedError):
    """A signature, digest, certificate or log proof does not verify.

    Deliberately *not* a ValueError: tampering must never be handled as a bad argument.
    """

    exit_code = 4


class DigestMismatchError(VerificationError):
    """Content does not hash to the digest that was promised for it."""


# --- transfer ------------------------------------------------------------------------------


class TransferError(FlexfedError):
    """An upload or download failed or was interrupted."""

    exit_code = 5


# --- assembly ------------------------------------------------------------------------------


class AssemblyError(FlexfedError):
    """Experts cannot be assembled (or removed) as asked."""

    exit_code = 6


class OutputExistsError(AssemblyError, FileExistsError):
    """The output directory already exists and would be overwritten."""
