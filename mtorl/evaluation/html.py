"""The evaluation report as one self-contained HTML page (``report.html`` beside ``report.md``).

The Markdown report stays the source: it is rendered with Python-Markdown (tables extension), and
every PNG it references, plus ``training_curves.png`` when the run has one, is embedded as a base64
``data:`` URI. The page has no script and loads nothing from outside, so it opens from a mail
attachment, an object-store download or a CI artifact alike. No Ray, no torch.
"""

from __future__ import annotations

import base64
import html
import os
import re

HTML_FILE = "report.html"
EXTRA_PLOTS = (("training_curves.png", "Training curves"),)
_IMG = re.compile(r'(<img\b[^>]*?\bsrc=")([^":]+\.png)(")')
_STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #1b1f24; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
img { max-width: 100%; height: auto; display: block; margin: 1em 0; }
code { background: #f6f8fa; padding: 0 3px; }
"""


def _data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def render_html(markdown_text: str, out_dir: str, title: str = "Evaluation report") -> str:
    """The page for ``markdown_text`` whose images are files in ``out_dir`` (missing ones are left out)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")

    def embed(m: re.Match[str]) -> str:
        p = os.path.join(out_dir, os.path.basename(m.group(2)))
        return f"{m.group(1)}{_data_uri(p)}{m.group(3)}" if os.path.exists(p) else f'{m.group(1)}{m.group(3)}'

    body = _IMG.sub(embed, body)
    body = re.sub(r'<p><img\b[^>]*\bsrc=""[^>]*></p>', "", body)  # an image that isn't there: no broken icon
    for fname, heading in EXTRA_PLOTS:
        p = os.path.join(out_dir, fname)
        if os.path.exists(p) and fname not in markdown_text:
            body += f'\n<h2>{html.escape(heading)}</h2>\n<p><img alt="{html.escape(heading)}" src="{_data_uri(p)}"></p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<link rel=\"icon\" href=\"data:,\">\n<style>{_STYLE}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")


def write_html(out_dir: str, markdown_file: str = "report.md") -> str:
    """Write ``report.html`` next to ``markdown_file`` in the local directory ``out_dir``; returns its path."""
    with open(os.path.join(out_dir, markdown_file), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"^# (.+)$", text, flags=re.M)
    page = render_html(text, out_dir, title=m.group(1).strip() if m else "Evaluation report")
    path = os.path.join(out_dir, HTML_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)
    return path
