"""Domain errors of the experts library.

Every error names the file (and, where there is one, the tensor) it is about, so that a user who brought a
bad expert file reads what is wrong without a stack trace. The server maps these to OpenAI-shaped errors.
"""

from __future__ import annotations


class ExpertError(Exception):
    """Base class of every error raised by the experts library."""


class ExpertFormatError(ExpertError):
    """An expert file is malformed: unknown tensor, wrong length, NaN/Inf, bad metadata."""

    def __init__(self, path: object, message: str, tensor: str | None = None):
        self.path, self.tensor = str(path), tensor
        where = f"{self.path}" + (f", tensor {tensor!r}" if tensor else "")
        super().__init__(f"{where}: {message}")


class DegenerateZ(ExpertError):
    """A z-vector (or a mix of them) for which the SVF rescale c = Σs / Σ(s ⊙ z) is not finite or out of range."""


class IncompatibleExpert(ExpertError):
    """An expert was made for other base weights than the ones loaded."""


class ExpertNotFound(ExpertError, KeyError):
    """A requested expert is not loaded."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "expert not found"


class FactorCacheError(ExpertError):
    """The factor cache on disk is unreadable or inconsistent."""
