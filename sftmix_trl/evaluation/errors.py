"""The evaluation's one exception: a problem the user can fix, reported in one line by `sftmix_trl.runs.launch`."""

from __future__ import annotations

from ..errors import SFTMixError


class EvalError(SFTMixError):
    """Bad evaluation input (task list, data file, adapter folder, NLTK data); the message says what to change."""
