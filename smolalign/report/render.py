"""The report's blocks (paragraphs, tables, figures, answers side by side): each renders itself as Markdown and
as HTML, so report.md and report.html always say the same thing. The HTML opens offline: inline CSS, no scripts."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1240px;
  margin:2em auto;padding:0 1.5em}
h1{font-size:1.6em;margin-bottom:.2em}
h2{margin-top:2em;padding-bottom:.3em;border-bottom:1px solid #d0d7de}
h3{font-size:1em;margin:.2em 0 .5em}
nav{color:#57606a}nav a{margin-right:1em;color:#0969da;text-decoration:none}
code{background:#f6f8fa;padding:1px 4px;border-radius:3px;font-size:.9em}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top;
  font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
th{background:#f6f8fa}
tr.differs td{background:#fff8c5;font-weight:600}
details>summary{cursor:pointer;color:#57606a;margin:.6em 0}
.figures{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;max-width:100%}
figure img{max-width:100%;height:auto;border:1px solid #eaeef2}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;font:13px/1.45 ui-monospace,Menlo,Consolas,monospace}
.sample{border:1px solid #d0d7de;border-radius:6px;padding:.8em 1em;margin:1em 0}
.prompt{background:#f6f8fa;padding:.6em;border-radius:4px;max-height:16em;overflow:auto}
.answers{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:10px;margin-top:.8em}
.answer{border:1px solid #d0d7de;border-left:4px solid #0969da;border-radius:4px;padding:.5em .7em}
.answer.reference{border-left-color:#8c959f;background:#fafbfc}
.answer.win{border-left-color:#1a7f37}.answer.loss{border-left-color:#cf222e}.answer.tie{border-left-color:#bf8700}
.who{font-size:.85em;margin-bottom:.3em}.who span{color:#57606a}
"""


@dataclass
class Paragraph:
    """Prose; `code` spans become <code> in HTML."""

    text: str

    def markdown(self) -> str:
        return self.text

    def html(self) -> str:
        return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(self.text)) + "</p>"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    highlighted: set[int] = field(default_factory=set)  # indices of rows to stand out (settings that differ)

    def markdown(self) -> str:
        lines = [_markdown_row(self.header), "|" + " --- |" * len(self.header)]
        lines += [_markdown_row(row, bold_label=i in self.highlighted) for i, row in enumerate(self.rows)]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in self.header)
        body = "".join(
            ('<tr class="differs">' if i in self.highlighted else "<tr>")
            + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
            for i, row in enumerate(self.rows)
        )
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


@dataclass
class Figures:
    images: list[tuple[str, str]]  # (path relative to the report, description)

    def markdown(self) -> str:
        return "\n\n".join(f"![{alt}]({path})" for path, alt in self.images)

    def html(self) -> str:
        figures = "".join(f'<figure><img src="{html.escape(path)}" alt="{html.escape(alt)}"></figure>'
                          for path, alt in self.images)
        return f'<div class="figures">{figures}</div>'


@dataclass
class Collapsible:
    """Folded in HTML; in Markdown, which cannot fold, a bold line and the blocks after it."""

    summary: str
    blocks: list
    open: bool = False

    def markdown(self) -> str:
        return "\n\n".join([f"**{self.summary}**", *(block.markdown() for block in self.blocks)])

    def html(self) -> str:
        inner = "".join(block.html() for block in self.blocks)
        return f"<details{' open' if self.open else ''}><summary>{html.escape(self.summary)}</summary>{inner}</details>"


@dataclass
class Answer:
    title: str  # the run, or "reference"
    detail: str  # length, verdict, scores
    text: str
    kind: str  # CSS classes: "policy win", "reference", …


@dataclass
class Sample:
    """One prompt, shown once, and the answers to it side by side (one after the other in Markdown)."""

    heading: str
    prompt: str
    answers: list[Answer]

    def markdown(self) -> str:
        parts = [f"### {self.heading}", _markdown_code(self.prompt)]
        for answer in self.answers:
            parts += [f"**{answer.title}**" + (f" — {answer.detail}" if answer.detail else ""),
                      _markdown_code(answer.text)]
        return "\n\n".join(parts)

    def html(self) -> str:
        cards = "".join(
            f'<div class="answer {answer.kind}"><div class="who"><b>{html.escape(answer.title)}</b> '
            f"<span>{html.escape(answer.detail)}</span></div><pre>{html.escape(answer.text)}</pre></div>"
            for answer in self.answers
        )
        return (f'<div class="sample"><h3>{html.escape(self.heading)}</h3>'
                f'<pre class="prompt">{html.escape(self.prompt)}</pre><div class="answers">{cards}</div></div>')


@dataclass
class Section:
    title: str
    blocks: list

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts += [f"## {section.title}", *(block.markdown() for block in section.blocks)]
    return "\n\n".join(parts) + "\n"


def render_html(title: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>' + "".join(b.html() for b in s.blocks) + "</section>"
        for s in sections
    )
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n"
            f"<body><h1>{html.escape(title)}</h1><nav>{nav}</nav>\n{body}\n</body></html>\n")


def _markdown_row(cells: list[str], *, bold_label: bool = False) -> str:
    """A table row; a highlighted row has its label in bold, which every Markdown viewer shows."""
    cells = [cell.replace("|", "\\|").replace("\n", " ") for cell in cells]
    if bold_label:
        cells[0] = f"**{cells[0]}**"
    return "| " + " | ".join(cells) + " |"


def _markdown_code(text: str) -> str:
    """A fenced block longer than any backtick run inside, so answers show verbatim whatever they hold."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
