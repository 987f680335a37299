"""Errors that name the input at fault; the CLI prints them as one line."""


class MaceError(Exception):
    """Base class: anything a user can fix by changing an input or a setting."""


class ConceptError(MaceError):
    """A concept list or a single concept is malformed."""


class ModelLoadError(MaceError):
    """A model id or folder cannot be loaded."""


class ArtefactError(MaceError):
    """A stored artefact (statistics, LoRA, erasure file) is missing or inconsistent."""
