"""What a long solve shows while it runs, on stderr: the pass against the pass budget, the best relative error bound
against the tolerance, the Hessian-vector products so far and an estimate of the passes left.

The display is a tqdm bar when tqdm is installed (a soft dependency: ``pip install tqdm``), else one plain line per
pass. ``progress=None`` shows it only when stderr is a terminal; ``True`` forces it (e.g. into a log file),
``False`` silences it.

The estimate assumes what a Lanczos iteration's bound does once the top eigenvalue is resolved: it falls
geometrically, so log₁₀(bound) falls by a steady amount per pass. Passes left ≈ (log₁₀ bound − log₁₀ tol) / rate,
with the rate measured over the last :data:`WINDOW` passes; while the bound is not falling, or a lower Ritz value
may still rise past the top (the certificate waits for it), no rate says when it ends, and the estimate is
"unknown".
"""
from __future__ import annotations

import math
import sys
import time
from typing import Any

WINDOW = 3  # passes the bound's rate of decrease is measured over: recent enough to follow a change of rate
EXPLORING = "still exploring: a lower Ritz value may rise past the top"


def wanted(progress: bool | None) -> bool:
    """Whether to show progress: ``True`` and ``False`` as given, ``None`` when stderr is a terminal."""
    if progress is None:
        stream = sys.stderr
        return stream is not None and stream.isatty()
    return bool(progress)


def _tqdm_class() -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


def write(line: str) -> None:
    """One line on stderr that does not tear an open tqdm bar (the training loop's own, or a solve's)."""
    tqdm = _tqdm_class()
    if tqdm is None:
        print(line, file=sys.stderr, flush=True)
    else:
        tqdm.write(line, file=sys.stderr)


def bound_text(rel_bound: float, tol: float) -> str:
    """A relative error bound against the tolerance, in words."""
    if not math.isfinite(rel_bound):
        return f"no bound yet (target {tol:.0e} of λ)"
    return f"bound {rel_bound:.1e} of λ, target {tol:.0e}"


def passes_left(history: list[tuple[int, float]], tol: float) -> int | None:
    """Passes until the relative bound reaches ``tol`` at its recent geometric rate, from ``history`` (pass, bound)
    of the passes whose bound counts (not exploring, finite and positive); None when the bound is not falling or
    fewer than two such passes are known. 0 when the bound already meets ``tol``."""
    if history and history[-1][1] <= tol:
        return 0
    recent = history[-WINDOW:]
    if len(recent) < 2:
        return None
    (p0, b0), (p1, b1) = recent[0], recent[-1]
    rate = (math.log10(b0) - math.log10(b1)) / (p1 - p0)  # decades per pass
    if not rate > 0:
        return None
    return max(1, math.ceil((math.log10(b1) - math.log10(tol)) / rate))


class SolveProgress:
    """The display of one solve. ``step`` once per pass, ``close`` once at the end (also when it failed).

    Args:
        enabled: ``True``, ``False`` or ``None`` (:func:`wanted`).
        label: what is being solved, e.g. ``"fasthess.eigs"``.
        tol: the relative tolerance the bound must reach.
        max_passes: the pass budget (``max_iters``).
    """

    def __init__(self, enabled: bool | None, label: str, tol: float, max_passes: int) -> None:
        self.enabled = wanted(enabled)
        self.label, self.tol, self.max_passes = label, float(tol), int(max_passes)
        self._history: list[tuple[int, float]] = []
        self._last = (0, math.inf, 0)  # pass, relative bound, products
        self._t0 = time.perf_counter()
        self._bar = None
        tqdm = _tqdm_class() if self.enabled else None
        if tqdm is not None:
            # no bar graphic: the pass budget is a ceiling, not a distance to the end; the postfix says what is left
            self._bar = tqdm(total=self.max_passes, desc=label, file=sys.stderr, leave=False, dynamic_ncols=True,
                             unit="pass", bar_format="{desc}: pass {n}/{total} [{elapsed}]{postfix}")

    def step(self, pass_no: int, rel_bound: float, hvps: int, exploring: bool) -> None:
        """Pass ``pass_no`` (from 1) ended with the largest relative bound ``rel_bound`` (bound / |θ|) over the
        wanted Ritz values, ``hvps`` products so far; ``exploring`` when a lower Ritz value may still rise past
        the wanted ones (the claim waits for it whatever the bound)."""
        if not self.enabled:
            return
        rel_bound = float(rel_bound)
        if not exploring and math.isfinite(rel_bound) and rel_bound > 0:
            self._history.append((pass_no, rel_bound))
        self._last = (pass_no, rel_bound, int(hvps))
        text = self._describe(rel_bound, int(hvps), exploring)
        if self._bar is not None:
            self._bar.n = pass_no
            self._bar.set_postfix_str(text, refresh=True)
        else:
            write(f"{self.label}: pass {pass_no}/{self.max_passes}, {text}")

    def close(self, converged: bool) -> None:
        """End the display with one line: certified or not, after how many passes and products, the final bound."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        pass_no, rel_bound, hvps = self._last
        verdict = "certified" if converged else "not certified"
        write(f"{self.label}: {verdict} after {pass_no} pass{'es' if pass_no != 1 else ''}, {hvps} HVPs, "
              f"{bound_text(rel_bound, self.tol)}, {time.perf_counter() - self._t0:.1f} s")

    def _describe(self, rel_bound: float, hvps: int, exploring: bool) -> str:
        if exploring:
            left = EXPLORING
        else:
            n = passes_left(self._history, self.tol)
            budget = self.max_passes - self._last[0]
            if n is None:
                left = "passes left: unknown (no steady decrease of the bound yet)"
            elif n == 0:
                left = "target met; a further pass confirms it"
            elif n > budget:
                left = f"more passes needed than the {budget} left in the budget"
            else:
                left = f"about {n} pass{'es' if n != 1 else ''} left"
        return f"{bound_text(rel_bound, self.tol)}, {hvps} HVPs, {left}"
