"""Deprecations kept for one release: options that became keyword-only, keywords that were renamed.

Every deprecation warns with :class:`FutureWarning`, not :class:`DeprecationWarning`: the call sites that
need changing are in the user's own scripts and notebooks, and Python hides ``DeprecationWarning`` unless
it is raised from ``__main__``, so a user who calls fasthess from a module of their own would first hear
of the change when the old call breaks. ``FutureWarning`` is shown by default (the category Python
documents for deprecations aimed at the users of an application, which fasthess's users are).
"""
from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

REMOVAL = "the next release"


def warn_deprecated(message: str, stacklevel: int = 1) -> None:
    """Warn (FutureWarning) that ``message``'s usage goes away in the next release; ``stacklevel`` counts from the
    function that calls this one, as in :func:`warnings.warn`."""
    warnings.warn(f"{message} (deprecated; it stops working in {REMOVAL})", FutureWarning, stacklevel=stacklevel + 1)


def positional_until(n: int, formerly: tuple[str, ...] | None = None) -> Callable[[F], F]:
    """Decorator for a function whose parameters after the first ``n`` became keyword-only.

    ``formerly`` names, in their old order, the keyword-only parameters that used to be accepted by position
    (default: all of them, in signature order). A call that still passes them by position works for one
    release: they are moved to keywords and a FutureWarning names the keywords to write instead.
    """
    def decorate(fn: F) -> F:
        params = list(inspect.signature(fn).parameters.values())
        keyword_only = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        names = tuple(keyword_only if formerly is None else formerly)
        positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if len(positional) != n or not set(names) <= set(keyword_only):
            raise TypeError(f"positional_until({n}, {formerly}) does not fit {fn.__qualname__}{inspect.signature(fn)}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if len(args) > n:
                extra = args[n:]
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__qualname__}() takes at most {n} positional arguments "
                                    f"({len(args)} given); pass the options as keywords")
                moved = dict(zip(names, extra))
                clash = sorted(moved.keys() & kwargs.keys())
                if clash:
                    raise TypeError(f"{fn.__qualname__}() got multiple values for argument {clash[0]!r}")
                keywords = ", ".join(f"{name}=..." for name in moved)
                warn_deprecated(f"{fn.__qualname__}(): pass {keywords} as keyword arguments; passing them by "
                                "position", stacklevel=2)
                args, kwargs = args[:n], {**kwargs, **moved}
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator for a function whose keyword ``old`` is now called ``new`` (``renamed_keywords(old="new")``): a
    call with ``old=`` works for one release, passing the value as ``new=`` with a FutureWarning."""
    def decorate(fn: F) -> F:
        accepted = inspect.signature(fn).parameters
        if not set(renames.values()) <= set(accepted) or set(renames) & set(accepted):
            raise TypeError(f"renamed_keywords({renames}) does not fit {fn.__qualname__}{inspect.signature(fn)}")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= and {new}=; pass only {new}=")
                    warn_deprecated(f"{fn.__qualname__}(): {old}= is now called {new}=; passing {old}=",
                                    stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
