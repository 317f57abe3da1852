"""Errors a user can act on. The CLI prints them as one line, never as a traceback."""

import numpy as np


class SdliteError(Exception):
    """A failure while running (exit code 1)."""

    exit_code = 1


class InputError(SdliteError):
    """Bad usage or bad input: a wrong size, a missing file, a corrupt model (exit code 2)."""

    exit_code = 2


class SdliteWarning(UserWarning):
    """Something the user asked for has no effect (the CLI prints it as one ``warning:`` line)."""


def non_finite(stage: str) -> SdliteError:
    """The error for NaN or infinity in what ``stage`` produced: such a result would otherwise become a black or
    noise image, written as if nothing had happened."""
    return SdliteError(
        f"{stage} produced non-finite values (NaN or infinity); the usual causes are float16 overflow "
        "(try --compute f32 or an fp32 variant) or a broken converted graph (convert again)"
    )


def check_finite(values: np.ndarray, stage: str) -> None:
    """Raise :func:`non_finite` for ``stage`` when ``values`` hold NaN or infinity."""
    if not np.isfinite(values).all():
        raise non_finite(stage)


def engine_failure(engine: str, graph: object, exc: BaseException) -> SdliteError:
    """The one-line error for a graph that failed while running (most often an allocation that did not fit)."""
    text = summarize(exc)
    hint = "; it ran out of memory: try a smaller size or batch, or --low-memory" if "alloc" in text.lower() else ""
    return SdliteError(f"{graph}: {engine} failed while running it ({text}){hint}")


def summarize(exc: BaseException, limit: int = 200) -> str:
    """The first informative line of a third-party exception, for a one-line error message.

    OpenVINO prefixes its messages with "Exception from <source file>" lines; those are skipped."""
    for line in str(exc).strip().splitlines():
        line = line.strip()
        if line and not line.startswith("Exception from"):
            return line[:limit]
    return type(exc).__name__
