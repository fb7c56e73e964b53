"""The package's one base error. Every problem a user can fix (a setting, a file, a record, a table that does not
fit) raises a subclass, so that the launcher (`sftmix_trl.runs.launch`) reports any of them in one line and a caller
of the library catches one type."""

from __future__ import annotations


class SFTMixError(ValueError):
    """A problem the user can fix; the message says what and how."""


class DataError(SFTMixError):
    """A data problem the user can fix: the message names the file, the record and the field."""
