"""The package's one base error. Every problem a user can fix (a setting, a file, a record, a table that does not
fit) raises a subclass, so that the launcher (`sftmix_trl.runs.launch`) reports any of them in one line and a caller
of the library catches one type."""

from __future__ import annotations


class SFTMixError(ValueError):
    """A problem the user can fix; the message says what and how."""


class DataError(SFTMixError):
    """A data problem the user can fix: the message names the file, the record and the field."""


class EvalError(SFTMixError):
    """Bad evaluation input (task list, data file, adapter folder, NLTK data); the message says what to change."""


class AdapterError(EvalError):
    """A saved adapter that is no PEFT LoRA adapter, or does not fit the base it is put on (evaluate, generate,
    merge, export)."""
