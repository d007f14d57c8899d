"""The run's broken files: each counted and logged once, whichever worker or rank met it.

DataLoader workers only report what they met (in each batch); a rank's loader collects the reports of its
workers; `sync()` (called by every rank at the same step, at logging time) merges the ranks' new reports, so rank 0
logs each file once and every rank returns the same count of distinct broken files.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch.distributed as tdist

log = logging.getLogger("dinospec.data.loader")

Report = tuple[str, str]  # (path, or shard:member, or a whole shard's path; reason)


class BrokenFiles:
    """Distinct broken files of this run: reported -> pending -> merged at sync (`known` is checkpointed with the
    run's progress, dinospec.checkpoint_state.Progress)."""

    def __init__(self) -> None:
        self.known: dict[str, str] = {}  # path -> reason, merged over ranks
        self._pending: dict[str, str] = {}  # reported here since the last sync

    def add(self, reports: Iterable[Report]) -> None:
        for path, reason in reports:
            if path not in self.known:
                self._pending.setdefault(path, reason)

    def local_count(self) -> int:
        """Distinct broken files this rank knows of (merged ones plus its own since the last sync)."""
        return len(self.known) + len(self._pending)

    def sync(self) -> int:
        """Merge every rank's new reports (a collective when a process group is up), log each new file once (on
        rank 0), and return the number of distinct broken files of the run so far (the same on every rank)."""
        pending = sorted(self._pending.items())
        self._pending = {}
        if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
            gathered: list[list[Report] | None] = [None] * tdist.get_world_size()
            tdist.all_gather_object(gathered, pending)
            pending = [report for part in gathered for report in part or []]
        main = not (tdist.is_available() and tdist.is_initialized()) or tdist.get_rank() == 0
        for path, reason in pending:
            if path not in self.known:
                self.known[path] = reason
                if main:
                    log.warning("skipping broken image %s (%s); %d broken so far", path, reason, len(self.known))
        return len(self.known)
