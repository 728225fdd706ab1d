"""HTML pages (.html, .htm): one document per page, its visible text only, so markup, scripts and
styles never reach the corpus while the paragraph structure does."""

from __future__ import annotations

from collections.abc import Iterator

from selectolax.lexbor import LexborHTMLParser

from tasks.data.readers.base import Bad, Doc, SourceFile
from tasks.data.readers.opening import ESCAPED, text_stream

#: Elements whose content is not visible text.
_HTML_DROP = ["script", "style", "noscript", "template", "head", "svg", "iframe", "object"]
#: Elements that start a new paragraph.
_HTML_BLOCKS = frozenset(
    {
        *("address", "article", "aside", "blockquote", "body", "caption", "center", "dd", "details"),
        *("dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header"),
        *("h1", "h2", "h3", "h4", "h5", "h6", "hr", "html", "legend", "li", "main", "menu", "nav", "ol"),
        *("p", "pre", "section", "summary", "table", "tbody", "tfoot", "thead", "title", "tr", "ul"),
    }
)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document: paragraphs (block elements) separated by blank lines, `<br>` as a
    newline, whitespace collapsed except inside `<pre>`."""
    tree = LexborHTMLParser(html)
    tree.strip_tags(_HTML_DROP)
    if tree.root is None:
        return ""
    paragraphs: list[str] = []
    pieces: list[str] = []
    verbatim = False
    pre_depth = 0

    def end_paragraph() -> None:
        nonlocal verbatim
        text = "".join(pieces)
        if verbatim:
            text = text.strip("\r\n")
        else:
            text = "\n".join(" ".join(line.split()) for line in text.split("\n")).strip("\n")
        if text.strip():
            paragraphs.append(text)
        pieces.clear()
        verbatim = False

    stack: list[tuple[object, bool]] = [(tree.root, False)]
    while stack:
        node, closing = stack.pop()
        tag = node.tag  # type: ignore[attr-defined]
        if closing:
            end_paragraph()
            if tag == "pre":
                pre_depth -= 1
            continue
        if tag == "-text":
            text = node.text_content or ""  # type: ignore[attr-defined]
            if pre_depth:
                verbatim = True
                pieces.append(text)
            else:
                pieces.append(" ".join(text.split("\n")))
            continue
        if tag.startswith(("-", "_", "!")):  # comments, doctype
            continue
        if tag == "br":
            pieces.append("\n")
            continue
        if tag in _HTML_BLOCKS:
            end_paragraph()
            stack.append((node, True))
            if tag == "pre":
                pre_depth += 1
        elif tag in ("td", "th"):
            pieces.append(" ")
        children = list(node.iter(include_text=True))  # type: ignore[attr-defined]
        stack.extend((child, False) for child in reversed(children))
    end_paragraph()
    return "\n\n".join(paragraphs)


def read_html(f: SourceFile) -> Iterator[Doc | Bad]:
    """The page's visible text as one document (a page with an undecodable byte is quarantined whole)."""
    with text_stream(f) as stream:
        html = stream.read()
    if ESCAPED.search(html):
        yield f.undecodable(f.rel, html)
        return
    yield f.doc(html_to_text(html), f.rel, html)
