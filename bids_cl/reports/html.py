"""Small HTML helpers shared by the participant report and group.html.

Pages are plain HTML5 with inline CSS and one inline script; images are relative links to files in the
output folder, so a page opens from disk, offline (no CDN, no web fonts) and stays a few tens of kB.
The script records, on ``load``, how many images rendered, row counts of tables and any error into a
hidden ``<div id="render-check">`` (read by the headless-browser tests; harmless for readers).
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

CSS = """
:root { --fg:#1d232a; --muted:#5b6672; --line:#d8dee4; --accent:#1f5fa8; --warn-bg:#fff4d6;
        --warn-line:#e0a800; --err-bg:#fde8e8; --err-line:#c62828; --ok:#2e7d32; }
* { box-sizing: border-box; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", Arial, sans-serif;
       color: var(--fg); margin: 0; line-height: 1.4; font-size: 14px; }
header { background: #10243e; color: #fff; padding: 12px 24px; }
header h1 { margin: 0; font-size: 20px; }
header .meta { color: #c5d3e6; font-size: 12px; }
nav { position: sticky; top: 0; background: #f4f6f8; border-bottom: 1px solid var(--line);
      padding: 6px 24px; z-index: 2; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
main { padding: 8px 24px 40px; max-width: 1200px; }
section { border-bottom: 1px solid var(--line); padding-bottom: 12px; }
h2 { font-size: 18px; margin: 22px 0 8px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
figure { margin: 6px 0 12px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); background: #000; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #eef2f6; position: sticky; top: 0; }
td { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: normal; min-width: 18em; }
.scroll { max-height: 480px; overflow: auto; display: inline-block; max-width: 100%; }
.box { padding: 8px 12px; margin: 8px 0; border-left: 4px solid; border-radius: 2px; }
.warning { background: var(--warn-bg); border-color: var(--warn-line); }
.error { background: var(--err-bg); border-color: var(--err-line); }
.note { color: var(--muted); font-size: 12px; }
.status-ok { color: var(--ok); font-weight: 600; }
.status-partial, .status-missing { color: #a06000; font-weight: 600; }
.status-failed { color: var(--err-line); font-weight: 600; }
pre { background: #f6f8fa; border: 1px solid var(--line); padding: 8px; overflow: auto;
      max-height: 360px; font-size: 12px; white-space: pre-wrap; }
details > summary { cursor: pointer; color: var(--accent); }
.kv th { position: static; width: 1%; white-space: nowrap; }
"""

# Runs before anything else on the page so it sees every error (capture phase catches failed <img>).
RENDER_CHECK_JS = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) { errors.push('resource: ' + (t.src || t.href)); }
    else { errors.push('script: ' + (e.message || 'error')); }
  }, true);
  var original = console.error;
  console.error = function () {
    errors.push('console: ' + Array.prototype.join.call(arguments, ' '));
    return original.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    var imgs = document.images, ok = 0, broken = [], tables = {};
    for (var i = 0; i < imgs.length; i++) {
      if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; }
      else { broken.push(imgs[i].getAttribute('src')); }
    }
    var tabs = document.querySelectorAll('table[data-rows-key]');
    for (var j = 0; j < tabs.length; j++) {
      var body = tabs[j].tBodies[0];
      tables[tabs[j].getAttribute('data-rows-key')] = body ? body.rows.length : 0;
    }
    var d = document.createElement('div');
    d.id = 'render-check';
    d.hidden = true;
    d.setAttribute('data-images', imgs.length);
    d.setAttribute('data-images-ok', ok);
    d.setAttribute('data-errors', errors.length);
    d.textContent = JSON.stringify({images: imgs.length, imagesOk: ok, broken: broken,
                                    errors: errors, tables: tables});
    document.body.appendChild(d);
  });
})();
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, digits: int | None = None) -> str:
    """Readable cell text: ``n/a`` for missing, ints without decimals, floats to ``digits``."""
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, default=str)
    if is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isfinite(value) and value.is_integer() and digits is None:
            return str(int(value))
        return f"{value:.{3 if digits is None else digits}f}"
    return str(value)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def table_html(frame: pd.DataFrame, *, rows_key: str | None = None, cls: str = "",
               digits: Mapping[str, int] | int | None = None,
               cell_html: Mapping[str, Callable[[Any, pd.Series], str]] | None = None,
               scroll: bool = True) -> str:
    """A DataFrame as an HTML table (escaped); ``cell_html`` overrides the HTML of named columns."""
    cell_html = cell_html or {}
    head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for col in frame.columns:
            value = row[col]
            d = digits.get(col) if isinstance(digits, Mapping) else digits
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and \
                not isinstance(value, bool) and not is_missing(value)
            text = fmt(value, d)
            inner = cell_html[col](value, row) if col in cell_html else esc(text)
            # Long free text (warnings, crash reasons) wraps; everything else stays on one line.
            kind = "num" if numeric else ("text" if len(text) > 40 else "")
            cells.append(f'<td class="{kind}">{inner}</td>' if kind else f"<td>{inner}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attrs = f' class="{esc(cls)}"' if cls else ""
    if rows_key is not None:
        attrs += f' data-rows-key="{esc(rows_key)}"'
    table = (f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>" + "".join(body)
             + "</tbody></table>")
    return f'<div class="scroll">{table}</div>' if scroll else table


def kv_table(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """Key/value table; nested mappings become nested tables."""
    pairs = items.items() if isinstance(items, Mapping) else items
    rows = []
    for key, value in pairs:
        if isinstance(value, Mapping) and value:
            inner = kv_table(value)
        else:
            inner = esc(fmt(value))
        rows.append(f"<tr><th>{esc(key)}</th><td>{inner}</td></tr>")
    return '<table class="kv"><tbody>' + "".join(rows) + "</tbody></table>"


def box(text: str, kind: str = "warning", *, raw: bool = False) -> str:
    return f'<div class="box {kind}">{text if raw else esc(text)}</div>'


def figure(src: str, caption: str, *, alt: str, link: str | None = None) -> str:
    img = f'<img src="{esc(src)}" alt="{esc(alt)}" loading="eager">'
    if link:
        img = f'<a href="{esc(link)}">{img}</a>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def page(title: str, body: str, *, nav: list[tuple[str, str]], meta: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(label)}</a>' for anchor, label in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style>"
        f"<script>{RENDER_CHECK_JS}</script></head>\n<body>"
        f"<header><h1>{esc(title)}</h1><div class=\"meta\">{meta}</div></header>"
        f"<nav>{links}</nav><main>\n{body}\n</main></body></html>\n"
    )
