"""Old spellings of the public API that keep working, with a `DeprecationWarning` naming the
new one. Users have scripts that call `pd.analyze(model, batch, loss_fn, "bf16")`; the API
moved every choice after the step's own inputs to keyword-only parameters, and such a call
should keep its meaning for a release or two rather than fail."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

Fn = TypeVar("Fn", bound=Callable[..., Any])


def positional_deprecated(*names: str) -> Callable[[Fn], Fn]:
    """Accept `names`, now keyword-only, also as extra positional arguments (in that order,
    after the function's positional parameters), warning that they are to be passed by name.

    >>> @positional_deprecated("dtype")
    ... def f(x, *, dtype="fp16"):
    ...     return x, dtype
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     f(1, "bf16")
    (1, 'bf16')
    >>> str(seen[0].message)
    "f(): pass dtype by name (dtype='bf16'); passing it by position is deprecated"
    """

    def decorate(fn: Fn) -> Fn:
        params = inspect.signature(fn).parameters.values()
        positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            extra = args[positional:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__name__}() takes at most {positional + len(names)} positional arguments")
                moved = dict(zip(names, extra, strict=False))
                for key in moved:
                    if key in kwargs:
                        raise TypeError(f"{fn.__name__}() got multiple values for argument {key!r}")
                spelled = ", ".join(f"{k}={v!r}" for k, v in moved.items())
                warnings.warn(
                    f"{fn.__name__}(): pass {', '.join(moved)} by name ({spelled}); passing it by position is deprecated",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs.update(moved)
                args = args[:positional]
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
