"""What the HTML reports share: the Jinja2 templates (``evaluate/templates/``), links relative to
the page (so a report opens from the disk, offline, wherever the folder was moved), and numbers
written as ``leaderboard.csv`` writes them."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

TEMPLATES = Path(__file__).resolve().parent / "templates"
REPORT_FILE = "report.html"  # in a run folder and in a sweep folder


def render(template: str, **context) -> str:
    """``templates/<template>`` filled with ``context`` (values are HTML-escaped)."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = num
    return env.get_template(template).render(generated=datetime.now().strftime("%Y-%m-%d %H:%M:%S"), **context)


def href(path: str | Path | None, page_dir: str | Path) -> str | None:
    """A link from a page in ``page_dir`` to ``path``: relative, '/'-separated, %-escaped (run folder
    names hold '=' and ','; a '#' or '%' in one would otherwise break the link)."""
    if path is None:
        return None
    rel = os.path.relpath(Path(path), Path(page_dir)).replace(os.sep, "/")
    return quote(rel, safe="/=,+@")  # ":" escaped: "a:b/x.png" would read as a URL scheme


def num(x, digits: int = 3) -> str:
    """A number as the leaderboard writes it (3 decimals; empty for none)."""
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


__all__ = ["REPORT_FILE", "href", "num", "render"]
