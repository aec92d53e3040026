"""A self-contained HTML page from figures and tables: report.html of a run folder.

Plain HTML with inline CSS; every image is embedded as a base64 PNG data URI, so the page
needs no network, no other file and no JavaScript, and it can be mailed or moved on its own.
Pure string functions: the run's data are gathered in `engine.html_report`.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 1.5em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
p.sub { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.4em 0.8em 0.8em 0; vertical-align: top; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #444; max-width: 60em; }
.note { color: #666; font-size: 0.9em; }
/* flex-start: stretched to the taller neighbour, a short table spread its rows apart
   (seen in headless Chromium) */
.cols { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
details summary { cursor: pointer; color: #335; }
"""


@dataclass(frozen=True)
class PageFigure:
    """A figure of the page: `name` (the img's data-figure attribute and alt text), its PNG
    bytes and a caption."""

    name: str
    png: bytes
    caption: str = ""


def png_data_uri(png: bytes) -> str:
    """`data:image/png;base64,...`. ValueError unless `png` starts with the PNG signature."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not PNG data")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def format_value(value: object) -> str:
    """A table cell's text: floats to 4 significant digits, None as a dash, lists joined."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {format_value(v)}" for k, v in value.items()) if value else "-"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value) if value else "-"
    return str(value)


def figure_html(figure: PageFigure) -> str:
    name = escape(figure.name)
    caption = f"<figcaption>{escape(figure.caption)}</figcaption>" if figure.caption else ""
    return (f'<figure><img src="{png_data_uri(figure.png)}" alt="{name}" '
            f'data-figure="{name}">{caption}</figure>')


def table_html(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A table; numbers right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(format_value(v))}</td>'
            if isinstance(v, int | float) and not isinstance(v, bool)
            else f"<td>{escape(format_value(v))}</td>" for v in row)
        body.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def key_value_html(items: Mapping[str, object]) -> str:
    """A two-column table of name / value."""
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(format_value(v))}</td></tr>"
                   for k, v in items.items())
    return f"<table>{rows}</table>"


def flatten(settings: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """Nested mappings to one level of dotted names (for a compact settings table)."""
    flat: dict[str, object] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def settings_html(settings: Mapping[str, object], *, columns: int = 2) -> str:
    """The settings as a compact table of `columns` name/value pairs per row."""
    items = list(flatten(settings).items())
    per_column = math.ceil(len(items) / columns) if items else 0
    groups = [items[c * per_column:(c + 1) * per_column] for c in range(columns)]
    rows = []
    for r in range(per_column):
        cells = []
        for group in groups:
            if r < len(group):
                key, value = group[r]
                cells.append(f"<th>{escape(key)}</th><td>{escape(format_value(value))}</td>")
            else:
                cells.append("<th></th><td></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>{''.join(rows)}</table>"


def section_html(title: str, *parts: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{''.join(parts)}</section>"


def note_html(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def page_html(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """The whole document: title, a line under it, the sections in order."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{escape(title)}</h1><p class=\"sub\">{escape(subtitle)}</p>"
            + "\n".join(sections) + "</body></html>\n")


__all__ = ["PNG_SIGNATURE", "PageFigure", "escape", "figure_html", "flatten", "format_value",
           "key_value_html", "note_html", "page_html", "png_data_uri", "section_html",
           "settings_html", "table_html"]
