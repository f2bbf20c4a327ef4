"""A progress bar for the engine's passes: tqdm on stderr, only for long calls.

``progress=True`` always shows it, ``False`` never, ``None`` when the call is
estimated to take more than :data:`AUTO_SECONDS` (estimated passes times the measured
cost of one pass). Without tqdm installed nothing is shown.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: The engine's progress callback: ``tick(n)`` after ``n`` more passes.
Tick = Callable[[int], None]

#: With ``progress=None``, show a bar for calls estimated to take longer than this.
AUTO_SECONDS = 5.0


class PassProgress:
    """Counts backward/forward passes; a tqdm bar once :meth:`start` decides to show."""

    def __init__(self, enabled: bool | None, desc: str = "GGN passes") -> None:
        self.enabled, self.desc, self.bar = enabled, desc, None

    def start(self, total: int, seconds: float) -> None:
        """Open the bar for ``total`` passes if enabled, or if ``seconds`` is long."""
        self.close()
        show = self.enabled if self.enabled is not None else seconds > AUTO_SECONDS
        if not show:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # optional dependency
            return
        self.bar = tqdm(total=total, file=sys.stderr, desc=self.desc, unit="pass")

    def __call__(self, n: int) -> None:
        """``n`` more passes are done."""
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        """Close the bar, if one is open."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
