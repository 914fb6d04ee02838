"""The Prefect UI's form of a flow: a description for every field, from the one definition of a run.

Prefect builds a deployment's form from the flow's signature (types, enumerations as dropdowns) and the `Args:`
section of its docstring (descriptions). `described` writes that section from the pydantic models' field
descriptions, so the form says what RunParameters says, and a parameter without a description is an error at import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from pydantic import BaseModel


def described(*models: type[BaseModel], **own: str) -> Callable:
    """Decorate a flow function (below @flow): its docstring gains `Args:` with each parameter's description, taken
    from `own` (the flow's own parameters) or else the first model that has a field of that name."""

    def decorate(fn: Callable) -> Callable:
        lines = []
        for name in inspect.signature(fn).parameters:
            text = own.get(name) or next((m.model_fields[name].description for m in models if name in m.model_fields), None)
            if not text:
                raise TypeError(f"{fn.__qualname__}: parameter {name!r} has no description for the Prefect form")
            lines.append(f"    {name}: {' '.join(text.split())}")
        fn.__doc__ = (inspect.getdoc(fn) or "").rstrip() + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate
