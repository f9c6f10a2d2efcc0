"""Progress over finished rows for backends: a rich bar on a TTY, a line per 10% otherwise."""

from __future__ import annotations

import sys
import time


class RowProgress:
    """``update(n)`` as rows finish; ``close()`` at the end."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.n = total, label, 0
        self._bar = None
        self._next_line = 0.1
        self._t0 = time.perf_counter()
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=False)
            self._bar.start()
            self._task = self._bar.add_task(f"generating ({label})", total=total)

    def update(self, n: int) -> None:
        """``n`` more rows finished."""
        self.n += n
        if self._bar is not None:
            self._bar.advance(self._task, n)
        elif self.n / self.total >= self._next_line or self.n == self.total:
            print(f"generating ({self.label}): {self.n}/{self.total} rows, "
                  f"{time.perf_counter() - self._t0:.1f} s", file=sys.stderr)
            self._next_line = (int(self.n / self.total * 10) + 1) / 10

    def close(self) -> None:
        """Stop the bar."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
