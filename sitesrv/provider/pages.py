"""Counting the pages of a spooled document (DESIGN.md, "Print providers").

PDF by its page tree (pypdf), PostScript by its DSC ``%%Pages:`` comment (or its
``%%Page:`` comments), plain text by form feeds and 66-line pages; anything else counts
as one page, with a warning. Every function here reads files and may be slow: call them
through `count_pages_off_thread` (or on a CPU thread pool), never on the reactor thread.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

log = Logger()

T = TypeVar("T")

#: Lines on a page of plain text (US Letter at 6 lines per inch, as CUPS' texttopdf).
LINES_PER_PAGE = 66

PDF = "application/pdf"
POSTSCRIPT = "application/postscript"
TEXT = "text/plain"
OCTET_STREAM = "application/octet-stream"

_CHUNK = 1 << 20
# %%Pages: N (with an optional page order after it) or %%Pages: (atend).
_PAGES = re.compile(rb"%%Pages:\s*(\(atend\)|\d+)")
_PAGE = re.compile(rb"%%Page:")


@attrs.frozen
class PageCount:
    """How many pages one copy of a document has, how that was found, and any warning."""

    pages: int
    method: str
    warning: str = ""


def sniff(head: bytes, declared: str) -> str:
    """The format to count by: the declared one, or for octet-stream what the bytes say."""
    base = declared.split(";", 1)[0].strip().lower()
    if base in (PDF, POSTSCRIPT, TEXT):
        return base
    if head.lstrip(b"\x00\t\r\n ").startswith(b"%PDF-") or b"%PDF-" in head[:1024]:
        return PDF
    # PostScript may start with a PJL header or a DOS EPS binary header; both are rare
    # from IPP clients, so only the plain "%!" start is recognised.
    if head.startswith(b"%!"):
        return POSTSCRIPT
    return base or OCTET_STREAM


def count_pages(path: str, document_format: str) -> PageCount:
    """Count the pages of one copy of the document at ``path`` (blocking)."""
    with open(path, "rb") as f:
        head = f.read(1024)
    kind = sniff(head, document_format)
    if kind == PDF:
        return count_pdf(path)
    if kind == POSTSCRIPT:
        with open(path, "rb") as f:
            return count_postscript(f)
    if kind == TEXT:
        with open(path, "rb") as f:
            return count_text(f)
    return PageCount(1, "default", f"cannot count pages of {document_format or 'unknown'}")


def count_pdf(path: str) -> PageCount:
    """Pages of a PDF from its page tree; 1 and a warning if it cannot be read."""
    from pypdf import PdfReader

    # pypdf logs every oddity it repairs; those are not the provider's news.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(path, strict=False)
        if reader.is_encrypted:
            # Most "encrypted" PDFs have an empty user password (only printing or
            # copying is restricted); their page tree can be read after decrypting.
            reader.decrypt("")
        pages = len(reader.pages)
    except Exception as e:  # pypdf raises many kinds of errors for broken files
        return PageCount(1, "default", f"cannot read the PDF: {type(e).__name__}: {e}")
    if pages < 1:
        return PageCount(1, "default", "the PDF has no pages")
    return PageCount(pages, "pdf")


def count_postscript(f: BinaryIO) -> PageCount:
    """Pages of a PostScript file from its DSC comments.

    The header's ``%%Pages: N`` counts, unless it is ``(atend)``: then the trailer's
    (the last one outside embedded documents). Without either, the ``%%Page:`` comments
    are counted; without those, 1 page and a warning.
    """
    header: int | None = None
    trailer: int | None = None
    atend = False
    page_comments = 0
    depth = 0
    for line in f:
        if not line.startswith(b"%%"):
            continue
        if line.startswith(b"%%BeginDocument"):
            depth += 1
            continue
        if line.startswith(b"%%EndDocument"):
            depth = max(0, depth - 1)
            continue
        if depth:
            # An embedded EPS or document has its own DSC comments; they do not count.
            continue
        match = _PAGES.match(line)
        if match:
            value = match.group(1)
            if value == b"(atend)":
                # Only the header may defer its count to the trailer.
                atend = atend or (header is None and trailer is None)
            elif header is None and not atend:
                header = int(value)
            else:
                trailer = int(value)
            continue
        if _PAGE.match(line):
            page_comments += 1
    if header is not None:
        return PageCount(max(header, 1), "dsc", _zero(header))
    if trailer is not None:
        return PageCount(max(trailer, 1), "dsc", _zero(trailer))
    if page_comments:
        return PageCount(page_comments, "dsc-page-comments")
    return PageCount(1, "default", "no %%Pages or %%Page comments in the PostScript")


def _zero(pages: int) -> str:
    return "the PostScript says it has 0 pages" if pages == 0 else ""


def count_text(f: BinaryIO) -> PageCount:
    """Pages of plain text: a form feed starts a new page, and so does every 66th line."""
    pages = 0
    lines = 0  # complete lines on the current form-feed section
    partial = False  # characters after the last newline of the section
    any_content = False  # the current section has begun (bytes or a form feed before it)
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        pieces = chunk.split(b"\f")
        for index, piece in enumerate(pieces):
            if piece:
                any_content = True
                newlines = piece.count(b"\n")
                lines += newlines
                partial = not piece.endswith(b"\n")
            if index < len(pieces) - 1:
                # A form feed ends this section: it fills at least one page.
                pages += _section_pages(lines, partial)
                lines, partial, any_content = 0, False, False
    if any_content:
        pages += _section_pages(lines, partial)
    return PageCount(pages, "text")


def _section_pages(lines: int, partial: bool) -> int:
    total = lines + (1 if partial else 0)
    return max(1, -(-total // LINES_PER_PAGE))


def count_pages_off_thread(
    path: str,
    document_format: str,
    run: Callable[..., Deferred[Any]] | None = None,
) -> Deferred[PageCount]:
    """`count_pages` on a thread (``run``, default the reactor's pool); warnings logged."""

    def counted(result: PageCount) -> PageCount:
        if result.warning:
            log.warn(
                "counted {path} as {pages} page(s): {warning}",
                path=path,
                pages=result.pages,
                warning=result.warning,
            )
        return result

    runner: Callable[..., Deferred[Any]] = run or deferToThread
    d: Deferred[PageCount] = runner(count_pages, path, document_format)
    return d.addCallback(counted)
