"""Mistakes in what a person asked for, told apart from bugs.

``train.py`` and ``evaluate.py`` print an expected mistake as one line, ``Error: <what is wrong
and the fix>``, and exit with status 2, with no traceback (``SEEING_DEBUG=1`` or
``HYDRA_FULL_ERROR=1`` shows it); anything else keeps its traceback. What counts as a mistake
(:func:`mistake_message`):

- a :class:`UsageError` anywhere;
- an error this package raised on purpose: a ``ValueError``, ``FileNotFoundError``, ``OSError``,
  ``KeyError`` or ``TypeError`` whose innermost frame is a ``raise`` statement in ``seeing``
  (every check here words its message for the person who set the value; a ``ValueError`` from
  torch, or a failed unpacking in this package, is a bug and keeps its traceback);
- Hydra's composition errors (an unknown choice or key, a malformed override) and Lightning's
  ``MisconfigurationException``;
- any of these wrapped by OmegaConf while it resolved an interpolation, or by Hydra's
  ``instantiate`` (a key the module does not take, a ``_target_`` that names nothing importable).
"""
from __future__ import annotations

import ast
import functools
import linecache
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
OWN_KINDS = (ValueError, FileNotFoundError, OSError, KeyError, TypeError)
EXIT_STATUS = 2  # like argparse's usage errors; a crash exits with 1


class UsageError(ValueError):
    """A setting, choice or file that cannot be used; the message names it and the fix."""


class StopBeforeWork(SystemExit):
    """A :class:`UsageError` found where Hydra would turn an exception into a warning (its
    callbacks): a SystemExit passes through them. ``code`` is the message, so that without the
    entry points' handler Python still prints it."""

    def __init__(self, error: BaseException, message: str | None = None):
        super().__init__(message or mistake_message(error) or str(error))
        self.error = error


def _raised_here(err: BaseException) -> bool:
    """The innermost frame of ``err`` is a ``raise`` statement in this package."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename)
    try:
        filename.resolve().relative_to(PACKAGE)
    except ValueError:
        return False
    return tb.tb_lineno in _raise_lines(str(filename))


@functools.lru_cache(maxsize=64)
def _raise_lines(filename: str) -> frozenset[int]:
    """Every line a ``raise`` statement of the file spans (a message may take several lines)."""
    try:
        tree = ast.parse("".join(linecache.getlines(filename)))
    except SyntaxError:  # pragma: no cover - the file ran
        return frozenset()
    return frozenset(line for node in ast.walk(tree) if isinstance(node, ast.Raise)
                     for line in range(node.lineno, (node.end_lineno or node.lineno) + 1))


def one_line(text: str) -> str:
    """A message as one line: Hydra's "Available options" lists joined with commas, other lines
    with spaces; OmegaConf's ``full_key:`` / ``object_type=`` trailers dropped."""
    lines = [ln.strip() for ln in str(text).splitlines()]
    out: list[str] = []
    listing: list[str] | None = None
    for ln in lines:
        if ln.startswith("Config search path:"):  # Hydra's list of where it looked
            break
        if not ln or ln.startswith(("full_key:", "object_type=", "reference_type=")):
            continue
        if listing is not None and re.fullmatch(r"[\w./+-]+", ln):
            listing.append(ln)
            continue
        if listing is not None:
            out[-1] += " " + ", ".join(listing)
            listing = None
        if ln.startswith("Available options"):
            listing = []
            if out and not out[-1].endswith((".", ":")):
                out[-1] += "."
        out.append(ln)
    if listing is not None:
        out[-1] += " " + ", ".join(listing)
    return " ".join(out)


def _hydra_kinds() -> tuple[type, ...]:
    kinds: list[type] = []
    try:
        from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

        kinds += [ConfigCompositionException, MissingConfigException, OverrideParseException]
    except ImportError:  # pragma: no cover
        pass
    if "lightning_fabric" in sys.modules:  # raised only once Lightning runs (importing it takes seconds)
        from lightning_fabric.utilities.exceptions import MisconfigurationException

        kinds.append(MisconfigurationException)
    return tuple(kinds)


def _unread_key(text: str) -> str | None:
    """Hydra's message for a config key the built class does not take (``+stage.foo=1``), reworded."""
    arg = re.search(r"unexpected keyword argument '(\w+)'", text)
    if arg is None:
        return None
    target = re.search(r"Error in call to target '([\w.]+)'", text)
    node = re.search(r"full_key: ([\w.]+)", text)
    key = f"{node[1]}.{arg[1]}" if node else arg[1]
    return (f"{key}: nothing reads this setting ({target[1] if target else 'the target'} takes no argument "
            f"{arg[1]!r}); remove it from the command line")


def _unknown_target(err: BaseException) -> str | None:
    """Hydra's message for a ``_target_`` that names no importable object (``stage._target_=a.b.C``),
    reworded; None when the module exists but failed while importing (a bug, kept with its traceback)."""
    found = re.search(r"Error locating target '([\w.]+)'", str(err))
    if found is None:
        return None
    root = err
    while (root.__cause__ or root.__context__) is not None:
        root = root.__cause__ or root.__context__
    target = found[1]
    missing_module = isinstance(root, ModuleNotFoundError) and root.name and (
        target == root.name or target.startswith(root.name + "."))
    if not (missing_module or isinstance(root, AttributeError)):
        return None
    node = re.search(r"full_key: ([\w.]+)", str(err))
    key = f"{node[1]}._target_" if node else "_target_"
    return f"{key}={target}: no such class or function can be imported; check the dotted name"


def _wrappers() -> tuple[type, ...]:
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError

    return InterpolationResolutionError, InstantiationException


def mistake_message(err: BaseException | None) -> str | None:
    """The one-line message of an expected mistake (see the module docstring), None for a bug."""
    if err is None:
        return None
    if isinstance(err, StopBeforeWork):
        return str(err.code)
    if isinstance(err, _wrappers()):  # OmegaConf's and Hydra's wrappers (some are ValueErrors too)
        inner = err.__cause__ or err.__context__
        found = mistake_message(inner) if inner is not None and inner is not err else None
        if found is not None:
            return found
        return _unread_key(str(err)) or _unknown_target(err)
    if isinstance(err, UsageError) or (isinstance(err, OWN_KINDS) and _raised_here(err)):
        return one_line(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
    if isinstance(err, _hydra_kinds()):
        text, cause = str(err), err.__cause__
        override = getattr(err, "override", None)  # an override Hydra cannot parse
        if override and override not in text:
            text = f"cannot read the override {override!r}: {text}"
        if cause is not None and str(cause) and str(cause).splitlines()[0] not in text:
            text += f" ({str(cause).splitlines()[0]})"
        return one_line(text)
    return None
