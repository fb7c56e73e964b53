"""Records that cannot train: dropped, counted per reason, logged, recorded, and a stop when too many go.

One policy for every format. A record is dropped when nothing in it can be trained, or when it repeats an earlier
record (its example id would then name two rows; see `REASONS`); each reason is logged once with its count and the
first few record locations, the counts go into `sftmix_run.json` and the model card, and the run stops (one
`DataError` naming the reasons) when the dropped share passes `max_dropped_fraction` or nothing is left. Records are
dropped at two stages: reading (the record's own shape, and repeats) and the pre-write check (the chat template and
`max_length`); the dropped share compounds the two, since the second stage sees only what the first kept (and, with
a mixture's `fraction`, a sample of it).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from sftmix_trl.errors import DataError

logger = logging.getLogger(__name__)

# reason -> what the log line says
REASONS = {
    "empty_conversation": "empty conversation (no message)",
    "system_only": "only a system message",
    "no_reply": "no assistant reply after a prompt",
    "empty_reply": "every assistant reply is empty",
    "duplicate": "repeat of an earlier record (same prompt and completion)",
    "template_refused": "the chat template refuses to render it",
    "truncated": "every assistant reply truncated away at max_length",
}
SHOWN_LOCATIONS = 3
SHOWN_MESSAGES = 3
DEFAULT_MAX_DROPPED_FRACTION = 0.25


@dataclass
class DropLog:
    """Dropped records of one run.

    `max_dropped_fraction`: the share of records that may be dropped before the run stops.
    """

    max_dropped_fraction: float = DEFAULT_MAX_DROPPED_FRACTION
    counts: Counter = field(default_factory=Counter)
    locations: dict[str, list[str]] = field(default_factory=dict)  # the first few per reason
    messages: dict[str, Counter] = field(default_factory=dict)  # the template's own messages, per reason
    read: int = 0  # records read (stage 1)
    read_dropped: int = 0
    checked: int = 0  # examples the pre-write check saw (stage 2)
    checked_dropped: int = 0
    where: dict[str, str] = field(default_factory=dict)  # example id -> record location, for stage-2 drops
    dropped_keys: set = field(default_factory=set)

    def add(
        self, reason: str, location: str, message: str | None = None, stage: str = "read", key: str | None = None
    ) -> None:
        """Count one dropped record. `key` (an example id) counts an example once however often it is checked."""
        if reason not in REASONS:
            raise KeyError(reason)
        if key is not None:
            if key in self.dropped_keys:
                return
            self.dropped_keys.add(key)
        self.counts[reason] += 1
        shown = self.locations.setdefault(reason, [])
        if len(shown) < SHOWN_LOCATIONS:
            shown.append(location)
        if message:
            self.messages.setdefault(reason, Counter())[message] += 1
        if stage == "read":
            self.read_dropped += 1
        else:
            self.checked_dropped += 1

    def location(self, example_id: str) -> str:
        return self.where.get(example_id, f"example {example_id}")

    @property
    def dropped(self) -> int:
        return sum(self.counts.values())

    def dropped_fraction(self) -> float:
        """The share of the records read that will not train: compounded over the two stages."""
        kept = 1.0
        if self.read:
            kept *= 1 - self.read_dropped / self.read
        if self.checked:
            kept *= 1 - self.checked_dropped / self.checked
        return 1 - kept

    def describe(self, reason: str) -> str:
        text = f"{self.counts[reason]} {REASONS[reason]}"
        if reason in self.messages:
            said = "; ".join(f"{m!r} x{n}" for m, n in self.messages[reason].most_common(SHOWN_MESSAGES))
            text += f" (the template says: {said})"
        return text + f", e.g. {', '.join(self.locations[reason])}"

    def log(self, reasons=None) -> None:
        """One line per reason: its count, the template's messages and the first few record locations."""
        for reason in reasons or REASONS:
            if self.counts[reason]:
                logger.warning("dropped %s", self.describe(reason))

    def check(self, left: int) -> None:
        """Stop when nothing is left, or when the dropped share passes `max_dropped_fraction`."""
        share = self.dropped_fraction()
        if left and share <= self.max_dropped_fraction:
            return
        reasons = "; ".join(self.describe(r) for r in REASONS if self.counts[r])
        if not left:
            raise DataError(f"no record can train: {reasons or 'the data is empty'}")
        fix = "remove the repeated records, " if self.counts["duplicate"] else ""
        raise DataError(
            f"{share:.1%} of the records cannot train, more than max_dropped_fraction={self.max_dropped_fraction}: "
            f"{reasons}. Check the file's format (dataset_format, role_map), {fix}or raise `max_dropped_fraction`"
        )

    def as_dict(self) -> dict:
        """The counts as `sftmix_run.json` and the model card record them."""
        return {
            "records_read": self.read,
            "dropped": {reason: self.counts[reason] for reason in REASONS if self.counts[reason]},
            "dropped_fraction": round(self.dropped_fraction(), 6),
            "max_dropped_fraction": self.max_dropped_fraction,
            "examples": {reason: list(self.locations[reason]) for reason in self.locations},
        }
