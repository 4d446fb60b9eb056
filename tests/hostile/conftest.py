"""The hostile-input corpus: each module checks one category of outside input against the
real services (HTTP) or the real CLI, and records how many of its cases got their
documented answer; the run ends with that count per category."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest

# category -> (every case name run, the names that fell short in some run); a case run on
# both warehouses counts once.
_TALLY: dict[str, tuple[set[str], set[str]]] = defaultdict(lambda: (set(), set()))


@dataclass
class Corpus:
    """Collects each case's problems; the test fails listing every case that fell short."""

    category: str
    cases: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, case: str, problems: list[str]) -> None:
        """One case done: ``problems`` empty means it got its documented answer."""
        self.cases += 1
        names, failed = _TALLY[self.category]
        names.add(case)
        if problems:
            failed.add(case)
            self.failures.append(f"{case!r}: " + "; ".join(problems))

    def done(self) -> None:
        assert self.cases > 0, f"no {self.category} cases ran"
        assert not self.failures, f"{len(self.failures)} {self.category} cases:\n" + "\n".join(
            self.failures
        )


@pytest.fixture
def corpus(request: pytest.FixtureRequest) -> Corpus:
    """A per-test collector; the category is the test's ``category`` marker argument."""
    marker = request.node.get_closest_marker("category")
    assert marker is not None, "mark hostile tests with @pytest.mark.category('...')"
    return Corpus(marker.args[0])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TALLY:
        return
    terminalreporter.section("hostile-input corpus: cases handled per category")
    total = handled = 0
    for category, (names, failed) in sorted(_TALLY.items()):
        total += len(names)
        handled += len(names - failed)
        terminalreporter.write_line(
            f"{category:<24} {len(names - failed):>4} of {len(names):>4} handled"
        )
    terminalreporter.write_line(f"{'all':<24} {handled:>4} of {total:>4} handled")
