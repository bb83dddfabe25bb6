"""One migration's log, bound to its rules, the way fail2ban's jail binds a log to its filter.

The log watcher reads the file; a `MigrationLog` turns each batch of its lines into the
policy's `LogParsed` event: it keeps the parser (with its progress), the recent lines an
incident quotes, and the counts the metrics report. A classified line leaves here as a
`LogEvidence` that carries the lines before it and its own number, so the incident
writer adds the lines that followed it by number, never by searching for its text.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

from .model import ITEM_SAMPLES, FailureClass, ItemError, ItemErrors, LogEvidence, LogParsed
from .rclone import ITEM, CompiledRules, RcloneLogParser

# (the line's own time or None, whether it was in the file before the guard read it)
CurrentLine = Callable[[float | None, bool], bool]

CONTEXT_LINES = 200  # kept per migration, for incident context
CONTEXT_BEFORE = 20  # lines before a classified line that travel with it
CONTEXT_AFTER = 20  # lines after it that the incident adds, when they have been read
CONTEXT_FALLBACK = 40  # an incident with no classified line quotes the log's last lines


class MigrationLog:
    def __init__(self, account: str, path: Path, rules: CompiledRules, utc: bool = False) -> None:
        self.account = account
        self.path = path
        self.utc = utc
        self.parser = RcloneLogParser(rules, utc=utc)
        self.lines_read = 0
        self.errors: Counter[FailureClass] = Counter()  # lines of current runs that acted
        self.item_errors: Counter[tuple[str, FailureClass]] = Counter()  # (rule, class)
        self.past_errors = 0  # classified lines of earlier runs: read, never acted on
        self._recent: deque[tuple[int, str]] = deque(maxlen=CONTEXT_LINES)

    def rebind(self, path: Path, rules: CompiledRules, utc: bool = False) -> None:
        """A reload: new rules (and maybe path); progress, context and counts go on."""
        self.path = path
        self.utc = utc
        self.parser = RcloneLogParser(rules, last_progress=self.parser.progress, utc=utc)

    def feed(
        self,
        lines: Sequence[str],
        backlog: bool = False,
        is_current: CurrentLine | None = None,
    ) -> LogParsed | None:
        """A batch of new lines → the event for the policy (None: nothing worth one).

        `backlog`: the lines were in the file before the guard first read it. Only lines
        of the current run can act: `is_current(logged_at, backlog)` (the policy's rule)
        says which; the others count for position and progress, and as `past_errors`.
        """
        first = self.lines_read
        tail = [line for _seq, line in islice(reversed(self._recent), CONTEXT_BEFORE)][::-1]
        self._recent.extend(zip(range(first, first + len(lines)), lines, strict=True))
        self.lines_read += len(lines)
        result = self.parser.feed(lines)
        # rclone --retries: an attempt that ended is followed by another one, which logs
        # again the items that fail again; the run's item errors are its last attempt's
        restart = max(
            (
                number
                for number, logged_at in result.attempts_ended
                if is_current is None or is_current(logged_at, backlog)
            ),
            default=-1,
        )
        evidence: list[LogEvidence] = []
        current, superseded = _ItemBatch(), _ItemBatch()
        window: list[str] = []
        for failure in result.failures:
            if is_current is not None and not is_current(failure.logged_at, backlog):
                self.past_errors += 1
                continue
            self.errors[failure.failure_class] += 1
            if failure.scope == ITEM and failure.failure_class != FailureClass.DISK_FULL:
                self.item_errors[(failure.rule, failure.failure_class)] += 1
                item = ItemError(
                    failure.object, failure.failure_class, failure.rule, failure.message
                )
                # before the restart: an attempt rclone tries again
                (superseded if failure.line_number < restart else current).add(item)
                continue
            if not window:
                window = [*tail, *lines]  # only built when a line acts
            index = len(tail) + failure.line_number
            evidence.append(
                LogEvidence(
                    failure.failure_class,
                    failure.rule,
                    failure.line,
                    first + failure.line_number,
                    tuple(window[max(0, index - CONTEXT_BEFORE) : index]),
                    failure.scope,
                    failure.logged_at,
                )
            )
        batch_items = current.errors()
        transferred = result.progress.bytes_transferred if result.progress else None
        if (
            not evidence
            and batch_items is None
            and superseded.total == 0
            and restart < 0
            and not result.progressed
            and transferred is None
        ):
            return None
        return LogParsed(
            self.account,
            tuple(evidence),
            result.progressed,
            transferred,
            batch_items,
            new_attempt=restart >= 0,
            superseded=superseded.errors(),
            total_bytes=result.progress.bytes_total if result.progress else None,
        )

    def context_for(self, evidence: LogEvidence | None) -> list[str]:
        """The lines an incident quotes: around the classified line, else the latest."""
        if evidence is None:
            return [line for _seq, line in self._recent][-CONTEXT_FALLBACK:]
        after = [
            line for seq, line in self._recent if evidence.seq < seq <= evidence.seq + CONTEXT_AFTER
        ]
        return [*evidence.before, evidence.line, *after]


class _ItemBatch:
    """A batch's item errors, bounded like ItemErrors: counts, the first and the latest."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, FailureClass]] = Counter()
        self.first: list[ItemError] = []
        self.last: deque[ItemError] = deque(maxlen=ITEM_SAMPLES)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, item: ItemError) -> None:
        self.counts[(item.rule, item.failure_class)] += 1
        if len(self.first) < ITEM_SAMPLES:
            self.first.append(item)
        else:
            self.last.append(item)  # a bounded deque: the batch's latest

    def errors(self) -> ItemErrors | None:
        if not self.counts:
            return None
        return ItemErrors(
            total=self.total,
            by_rule=tuple(sorted((rule, cls, n) for (rule, cls), n in self.counts.items())),
            first=tuple(self.first),
            last=tuple(self.last),
        )
