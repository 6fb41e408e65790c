"""The two kinds of data problem: a whole file is unusable (DataError), or one row is (RowError)."""

from __future__ import annotations


class DataError(ValueError):
    """Preparation cannot continue; the message names the file (and line or row) and what is wrong."""


class RowError(ValueError):
    """One row is unusable. `reason` is a short category counted in the report when bad rows are skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # rebuilt with both arguments when it comes back from a tokenizing process
        return RowError, (self.reason, self.detail)
