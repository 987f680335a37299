"""Errors that name the input at fault; the CLI prints them as one line."""


class MaceError(Exception):
    """Base class: anything a user can fix by changing an input or a setting."""


class ConceptError(MaceError):
    """A concept list or a single concept is malformed."""


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
