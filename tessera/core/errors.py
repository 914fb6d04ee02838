"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class TesseraError(Exception):
    """A problem with what the user asked for (input, config, data), not a bug in Tessera."""


class DataValidationError(TesseraError):
    """The data breaks the rules; `errors` holds every `path:line: message` found."""

    MAX_SHOWN = 20

    def __init__(self, errors: list[str], examples_checked: int | None = None):
        self.errors = errors
        self.examples_checked = examples_checked
        shown = "\n".join(errors[: self.MAX_SHOWN])
        more = len(errors) - self.MAX_SHOWN
        tail = f"\n... and {more} more error(s)" if more > 0 else ""
        head = f"{len(errors)} invalid record(s)"
        if examples_checked is not None:
            head += f" out of {examples_checked}"
        super().__init__(f"{head}; nothing was trained:\n{shown}{tail}")


class ConfigError(TesseraError):
    """An argument that can never work (a malformed duration, an unknown model): a usage error, exit 2."""


class LockTimeout(TesseraError, TimeoutError):
    """Another process held an inter-process lock (tessera.core.paths.file_lock) for longer than the caller would wait."""
