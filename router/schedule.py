"""Off-hours scheduling: routine work that waits for the night."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta


@dataclass(frozen=True)
class OffHours:
    """A daily window in the node's local time, e.g. 19:00-07:00 (it may wrap midnight)."""

    start: time
    end: time

    @classmethod
    def parse(cls, start: str, end: str) -> OffHours:
        """The window from two ``HH:MM`` strings (validated by the settings)."""
        return cls(time.fromisoformat(start), time.fromisoformat(end))

    def contains(self, moment: time) -> bool:
        """Whether a local time of day lies in the window."""
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def not_before(self, now_local: datetime) -> datetime | None:
        """When work may start (UTC, naive like the database), or None for "now"."""
        if self.contains(now_local.time()):
            return None
        start = now_local.replace(
            hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0
        )
        if start <= now_local:
            start += timedelta(days=1)
        return start.astimezone(UTC).replace(tzinfo=None)


def local_now() -> datetime:
    """Now, in the node's local time zone."""
    return datetime.now().astimezone()
