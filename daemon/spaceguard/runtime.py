"""One migration's log, bound to its rules, the way fail2ban's jail binds a log to its filter.

The log watcher reads the file; a `MigrationLog` turns each batch of its lines into the
policy's `LogParsed` event: it keeps the parser (with its progress), the recent lines an
incident quotes, and the counts the metrics report. A classified line leaves here as a
`LogEvidence` that carries the lines before it and its own number, so the incident
writer adds the lines that followed it by number, never by searching for its text.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from .model import FailureClass, LogEvidence, LogParsed
from .rclone import CompiledRules, RcloneLogParser

CONTEXT_LINES = 200  # kept per migration, for incident context
CONTEXT_BEFORE = 20  # lines before a classified line that travel with it
CONTEXT_AFTER = 20  # lines after it that the incident adds, when they have been read
CONTEXT_FALLBACK = 40  # an incident with no classified line quotes the log's last lines


class MigrationLog:
    def __init__(self, account: str, path: Path, rules: CompiledRules) -> None:
        self.account = account
        self.path = path
        self.parser = RcloneLogParser(rules)
        self.lines_read = 0
        self.errors: Counter[FailureClass] = Counter()
        self._recent: deque[tuple[int, str]] = deque(maxlen=CONTEXT_LINES)

    def rebind(self, path: Path, rules: CompiledRules) -> None:
        """A reload: new rules (and maybe path); progress, context and counts go on."""
        self.path = path
        self.parser = RcloneLogParser(rules, last_progress=self.parser.progress)

    def feed(self, lines: Sequence[str]) -> LogParsed | None:
        """A batch of new lines → the event for the policy (None: nothing worth one)."""
        first = self.lines_read
        tail = [line for _seq, line in islice(reversed(self._recent), CONTEXT_BEFORE)][::-1]
        self._recent.extend(zip(range(first, first + len(lines)), lines, strict=True))
        self.lines_read += len(lines)
        result = self.parser.feed(lines)
        evidence = []
        if result.failures:
            window = [*tail, *lines]  # only built when a line was classified
            for failure in result.failures:
                index = len(tail) + failure.line_number
                evidence.append(
                    LogEvidence(
                        failure.failure_class,
                        failure.rule,
                        failure.line,
                        first + failure.line_number,
                        tuple(window[max(0, index - CONTEXT_BEFORE) : index]),
                    )
                )
                self.errors[failure.failure_class] += 1
        transferred = result.progress.bytes_transferred if result.progress else None
        if not evidence and not result.progressed and transferred is None:
            return None
        return LogParsed(self.account, tuple(evidence), result.progressed, transferred)

    def context_for(self, evidence: LogEvidence | None) -> list[str]:
        """The lines an incident quotes: around the classified line, else the latest."""
        if evidence is None:
            return [line for _seq, line in self._recent][-CONTEXT_FALLBACK:]
        after = [
            line for seq, line in self._recent if evidence.seq < seq <= evidence.seq + CONTEXT_AFTER
        ]
        return [*evidence.before, evidence.line, *after]
