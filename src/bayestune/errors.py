"""The project's own error types: what the command line reports as one line.

Every error the package raises on purpose (bad settings, unusable input files or data, a run
whose result cannot be used) derives from :class:`BayesTuneError`; the command line turns those
into ``bayestune COMMAND: error: MESSAGE`` and exit status 2. Anything else (a bug, CUDA out of
memory, a failing library) keeps its traceback, because only the traceback can explain it.

Each class also keeps the built-in base it always had (``ValueError``, ``FileNotFoundError``,
``RuntimeError``), so code that catches those still works.
"""

from __future__ import annotations


class BayesTuneError(Exception):
    """Base of every error the package raises on purpose; its message says what to do."""


class ConfigError(BayesTuneError, ValueError):
    """A setting, flag or argument that cannot work (out of range, contradictory, unknown)."""


class DataError(BayesTuneError, ValueError):
    """Input that cannot be used as it is: a file's content, a data split, a record."""


class MissingFileError(BayesTuneError, FileNotFoundError):
    """An input file that is not there, usually because the stage writing it has not run."""


class RunFailedError(BayesTuneError, RuntimeError):
    """A run went through its steps but its result cannot be used (diverged, degenerate)."""
