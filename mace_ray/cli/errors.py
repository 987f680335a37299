"""How a ``mace-ray`` command ends on an error: bad input in one line (exit 2), a bug loud (exit 1).

Bad input is exactly the project's own error classes (``mace_core.errors.MaceError`` and its
subclasses), wherever they were raised: in the driver, or in a Ray worker, whose error comes
back as a ``RayTaskError`` that wraps it (Ray's wrapper is even an instance of the original
class, with Ray's traceback text as its message: the original is unwrapped for its line).
Anything else, a ValueError included, is a bug: its traceback, then one last line saying
so and where to report it, exit 1. A run that failed that way is marked failed and resumes
on rerun.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, metadata

import typer

from mace_core.errors import MaceError
from mace_ray.cli.options import EXIT_FAILURE, Failed, fail
from mace_ray.storage.base import StorageUnavailableError

# Where bugs go when the installed package names no issue tracker (pyproject's [project.urls]).
REPORT_TO = "the mace-ray issue tracker"


def report_bugs_to() -> str:
    """The issue tracker the installed package names (``Project-URL: Issues, ...``), else REPORT_TO."""
    try:
        urls = metadata("mace-ray").get_all("Project-URL") or []
    except PackageNotFoundError:
        return REPORT_TO
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip().lower() in ("issues", "bug tracker", "bugs", "tracker") and url.strip():
            return url.strip()
    return REPORT_TO


def _is_ray_task_error(e: BaseException) -> bool:
    """Whether ``e`` is Ray's wrapper of a task's error (a command that never started Ray
    never imports it)."""
    if "ray" not in sys.modules:
        return False
    from ray.exceptions import RayTaskError

    return isinstance(e, RayTaskError)


def input_error(e: BaseException) -> MaceError | None:
    """The user-fixable error behind ``e`` (unwrapping Ray's task errors), or None for a bug."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and _is_ray_task_error(cur) and id(cur) not in seen:
        seen.add(id(cur))
        cur = getattr(cur, "cause", None)  # the exception the remote task raised
    if cur is None or _is_ray_task_error(cur):
        return None
    return cur if isinstance(cur, MaceError) else None


def infrastructure_error(e: BaseException) -> BaseException | None:
    """The Ray system error behind ``e`` (a lost node, a dead worker or actor, a lost object),
    if any: the cluster failed, not the code."""
    if "ray" not in sys.modules:
        return None
    from ray.exceptions import RayError, RayTaskError

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, RayError) and not isinstance(cur, RayTaskError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _halt(e: BaseException) -> BaseException | None:
    """A BaseException that is not an Exception (KeyboardInterrupt, a SIGTERM stop) behind ``e``."""
    seen: set[int] = set()
    cur: BaseException | None = e.__cause__ or e.__context__
    while cur is not None and id(cur) not in seen:
        if not isinstance(cur, Exception):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def _named(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def bug_line(e: BaseException) -> str:
    """The last line of an unexpected failure: what it was, and that it is a bug (where to
    report it) or, for a Ray system error, a failure of the cluster (rerun to resume)."""
    infra = infrastructure_error(e)
    if infra is not None:
        return (
            f"mace-ray: the Ray cluster failed ({_named(infra)}): not a problem with your input; "
            "the same command resumes the run"
        )
    cause = getattr(e, "cause", None) if _is_ray_task_error(e) else None
    if isinstance(cause or e, StorageUnavailableError):  # S3 gone past its retry budget: not a bug
        return f"mace-ray: {str(cause or e).strip().splitlines()[0]}"
    return (
        f"mace-ray: internal error (a bug in mace-ray, not a problem with your input): {_named(cause or e)}. "
        f"Please report it to {report_bugs_to()} with the traceback above and the command line."
    )


@contextmanager
def reported_errors() -> Iterator[None]:
    """Run a command's body: MaceError (also from a Ray worker) -> one line, exit 2; any other
    exception -> its traceback and ``bug_line``, exit 1. Exits, usage errors, Ctrl-C and the
    erase driver's ``Interrupted`` (BaseExceptions, or typer's own) pass through untouched."""
    try:
        yield
    except (typer.Exit, typer.Abort, typer.TyperException):
        raise
    except Exception as e:
        halt = _halt(e)
        if halt is not None:  # Ctrl-C or a stop signal that came back wrapped (Ray's Cython wait)
            raise halt from None
        bad = input_error(e)
        if bad is not None:
            fail(str(bad))
        traceback.print_exception(e, file=sys.stderr)
        line = bug_line(e)
        typer.echo(line, err=True)
        raise Failed(line, EXIT_FAILURE) from None
