"""Report outputs as plug-ins: a registry of writers that ``audit`` and ``check`` iterate.

A writer turns a finished document (the audit.json dict, or the check.json dict) into one file
in the output folder and returns its path. ``fvsanity audit`` runs every writer registered for
the ``"audit"`` document (built in: ``json`` -> audit.json, ``markdown`` -> table.md, ``latex``
-> table.tex, ``html`` -> report.html, in that order); ``fvsanity check`` every writer for
``"check"`` (built in: ``json`` -> check.json). Adding an output is one function::

    from fvsanity.report.writers import register_writer

    @register_writer("csv", documents=("audit",))
    def write_csv(doc: dict, out: Path, document: str) -> Path:
        ...

Names are refused twice (a plug-in cannot silently replace a built-in); a test removes its toy
writer with :func:`unregister_writer`. (The same convention as the other registries:
register / names / get / unregister; unknown names are a one-line error with the choices.)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import FVSanityError
from ..registry import Registry

__all__ = [
    "DOCUMENTS",
    "ReportWriter",
    "WriterError",
    "register_writer",
    "unregister_writer",
    "get_writer",
    "writer_names",
    "write_outputs",
]

#: the documents a writer can serve: the audit (audit.json dict) and the check (check.json dict)
DOCUMENTS = ("audit", "check")


class WriterError(FVSanityError, KeyError):
    """An unknown or duplicate report-writer name, or an unknown document (one line)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class ReportWriter:
    """A registered report output.

    Attributes:
        name: registry name. fn: ``fn(doc: dict, out: Path, document: str) -> Path`` writes one
        file into the folder ``out`` (atomically) and returns it; ``document`` says which of
        :data:`DOCUMENTS` ``doc`` is. documents: the :data:`DOCUMENTS` it serves.
    """

    name: str
    fn: Callable[[dict, Path, str], Path]
    documents: frozenset


#: the report outputs (the package's one registry convention, :class:`fvsanity.registry.Registry`)
_WRITERS: Registry = Registry("report writer")
WRITERS = _WRITERS


def _check_documents(documents) -> frozenset:
    docs = frozenset(documents)
    bad = sorted(docs - set(DOCUMENTS))
    if bad or not docs:
        raise WriterError(f"unknown document {bad[0] if bad else None!r}; valid: {', '.join(DOCUMENTS)}")
    return docs


def register_writer(name: str, documents=("audit",)):
    """Decorator registering ``fn(doc, out, document) -> Path`` as the report output ``name`` for ``documents``."""
    if not isinstance(name, str) or not name:
        raise WriterError(f"report writer name must be a non-empty string, got {name!r}")
    docs = _check_documents(documents)

    def deco(fn):
        if name in _WRITERS:
            raise WriterError(f"report writer {name!r} is already registered; pick another name "
                              f"(registered: {', '.join(_WRITERS)})")
        _WRITERS.register(name, ReportWriter(name, fn, docs))
        return fn

    return deco


def unregister_writer(name: str) -> ReportWriter:
    """Remove ``name`` (tests and plug-ins that clean up); returns what it held."""
    get_writer(name)
    return _WRITERS.unregister(name)


def writer_names(document: str | None = None) -> list[str]:
    """Registered writer names (registration order), optionally only those for ``document``."""
    if document is not None:
        _check_documents([document])
    return [n for n, w in _WRITERS.items() if document is None or document in w.documents]


def get_writer(name: str) -> ReportWriter:
    """The :class:`ReportWriter` registered as ``name`` (one-line error naming the choices)."""
    try:
        return _WRITERS[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_WRITERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise WriterError(f"unknown report writer {name!r}{hint} (choices: {', '.join(_WRITERS)})") from None


def write_outputs(doc: dict, out: str | Path, document: str, names=None) -> dict[str, Path]:
    """Run the writers for ``document`` (all registered for it, or ``names``) on ``doc`` into
    ``out``; returns {name: path written}."""
    out = Path(out)
    chosen = writer_names(document) if names is None else list(names)
    written = {}
    for n in chosen:
        w = get_writer(n)
        if document not in w.documents:
            raise WriterError(f"report writer {n!r} does not write a {document} "
                              f"(valid: {', '.join(writer_names(document))})")
        written[n] = Path(w.fn(doc, out, document))
    return written


# ------------------------------------------------------------------------------ built in
@register_writer("json", documents=("audit", "check"))
def write_json(doc: dict, out: Path, document: str) -> Path:
    """``audit.json`` or ``check.json``: every number of the run."""
    from ..io import atomic_write_json

    p = out / f"{document}.json"
    atomic_write_json(p, doc)
    return p


@register_writer("markdown", documents=("audit",))
def write_markdown(doc: dict, out: Path, document: str) -> Path:
    """``table.md``: the per-unit sanity table (:func:`fvsanity.report.tables.to_markdown`)."""
    from ..io import atomic_write_text
    from .tables import to_markdown

    atomic_write_text(out / "table.md", to_markdown(doc))
    return out / "table.md"


@register_writer("latex", documents=("audit",))
def write_latex(doc: dict, out: Path, document: str) -> Path:
    """``table.tex``: the per-unit sanity table (:func:`fvsanity.report.tables.to_latex`)."""
    from ..io import atomic_write_text
    from .tables import to_latex

    atomic_write_text(out / "table.tex", to_latex(doc))
    return out / "table.tex"


@register_writer("html", documents=("audit",))
def write_html(doc: dict, out: Path, document: str) -> Path:
    """``report.html``: the self-contained report (:func:`fvsanity.report.html.write_report`)."""
    from .html import write_report

    return write_report(doc, out)
