"""Errors that name the input at fault; the CLI prints them as one line.

Only these classes are "bad input" (exit 2, one line): anything else that escapes a run is a
bug (exit 1, with its traceback), even a ValueError. So every check of something a user gave
(a file, a flag, a setting) raises one of them, naming the input.
"""


class MaceError(Exception):
    """Base class: anything a user can fix by changing an input or a setting."""


class ConceptError(MaceError):
    """A concept list or a single concept is malformed."""


class SettingError(MaceError, ValueError):
    """A setting or a command-line value is out of range or unknown.

    Also a ValueError, so that code which validates values the Python way (``except
    ValueError`` around a conversion) keeps working; the CLI tells it from a bug by its
    MaceError side.
    """


class ModelLoadError(MaceError):
    """A model id or folder cannot be loaded."""


class ArtefactError(MaceError):
    """A stored artefact (statistics, LoRA, erasure file) is missing or inconsistent."""


class GenerationError(MaceError):
    """The diffusion model produced unusable images (NaN / inf, e.g. fp16 overflow)."""


def quoted(text: str, limit: int = 60) -> str:
    """``repr(text)``, shortened past ``limit`` characters so that an error stays one readable
    line whatever the input (a 10,000-character concept names itself by its start)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
