"""A flow's parameters and its Prefect UI form, from the one definition of a run (RunParameters).

Prefect builds a deployment's form from the flow's signature (types, enumerations as dropdowns) and the `Args:`
section of its docstring (descriptions). `run_flow` gives a flow function that signature: every RunParameters
field with its type and default, then the flow's own parameters (those its `def` names, which may also replace a
run parameter, e.g. to make it required), and writes `Args:` from the fields' descriptions. So no flow lists the
run's parameters again, and a parameter without a description is an error at import.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from tessera.core.config import RunParameters


def run_parameters() -> list[inspect.Parameter]:
    """RunParameters' fields as keyword parameters with their defaults. A field with a default factory (a settings
    object) takes None, which means that default, so the form does not show a prefilled object."""
    params = []
    for name, field in RunParameters.model_fields.items():
        if field.default_factory is not None:
            annotation, default = field.annotation | None, None
        else:
            annotation, default = field.annotation, (inspect.Parameter.empty if field.is_required() else field.default)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def run_flow(**own: str) -> Callable:
    """Decorate a flow function (below @flow) that takes `**run_parameters` besides its own parameters: its signature becomes
    RunParameters' fields plus its own, and its docstring gains `Args:`, each description taken from `own` (for
    the flow's own parameters, or a flow's meaning of a run parameter) or else from RunParameters."""

    def decorate(fn: Callable) -> Callable:
        declared = {name: p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                    for name, p in inspect.signature(fn).parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        params = [declared.pop(p.name, p) for p in run_parameters()] + list(declared.values())
        # Python's rule for a signature: keyword-only parameters may come in any order, defaults or not
        fn.__signature__ = inspect.signature(fn).replace(parameters=params)
        lines = []
        for p in params:
            text = own.get(p.name) or (RunParameters.model_fields[p.name].description if p.name in RunParameters.model_fields else None)
            if not text:
                raise TypeError(f"{fn.__qualname__}: parameter {p.name!r} has no description for the Prefect form")
            lines.append(f"    {p.name}: {' '.join(text.split())}")
        fn.__doc__ = (inspect.getdoc(fn) or "").rstrip() + "\n\nArgs:\n" + "\n".join(lines) + "\n"
        return fn

    return decorate
