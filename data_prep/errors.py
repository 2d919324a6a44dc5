"""The one error type of a bad input file, shared by the NIfTI and DICOM readers."""

from __future__ import annotations


class BadInput(ValueError):
    """A series that cannot be used: ``path`` is the offending file, ``reason`` says why.

    The path is an attribute, not parsed back out of the message (paths may contain ": ")."""

    def __init__(self, path: str, reason: str):
        super().__init__(path, reason)  # both in args: the exception pickles across processes
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"
