"""A self-contained HTML page: each generated token coloured by how much proxy-tuning moved it
(green: the proxy made it likelier than the base did, red: less likely); tokens where the proxy's top
choice differs from the base's are underlined. Hovering a token shows every role's top tokens."""
from __future__ import annotations

import html
from pathlib import Path

ROLE_TITLES = (("proxy", "proxy"), ("base", "base"), ("expert", "expert"), ("anti_expert", "anti"))

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; line-height: 1.6; }
.prompt { color: #666; white-space: pre-wrap; font-family: monospace; }
.output { white-space: pre-wrap; font-family: monospace; border-left: 3px solid #ccc; padding-left: .8rem; }
.tok { position: relative; border-radius: 2px; }
.tok.changed { text-decoration: underline 2px; }
.tok .tip { display: none; position: absolute; left: 0; top: 1.5em; z-index: 10; background: #fff;
  border: 1px solid #999; padding: .4rem; font-size: .75rem; white-space: pre; box-shadow: 0 2px 6px #0003; }
.tok:hover .tip { display: block; }
h2 { font-size: 1rem; margin-top: 2rem; }
.legend span { padding: 0 .4rem; margin-right: .4rem; }
"""


def _colour(value: float) -> str:
    strength = min(1.0, abs(value)) * 0.85
    return f"rgba(0,160,60,{strength:.2f})" if value >= 0 else f"rgba(220,40,40,{strength:.2f})"


def _tip(token: dict) -> str:
    lines = ["p(chosen): " + "  ".join(f"{title} {token['chosen'][role]:.3f}" for role, title in ROLE_TITLES
                                        if role in token["chosen"])]
    for role, title in ROLE_TITLES:
        if role in token["top"]:
            tops = "  ".join(f"{piece!r} {p:.2f}" for piece, p in token["top"][role])
            lines.append(f"{title:>6}: {tops}")
    return html.escape("\n".join(lines))


def render(traces: list[dict], summary_lines: list[str], title: str = "proxy-tuning token analysis") -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in summary_lines]
    parts.append("<p class='legend'><span style='background:rgba(0,160,60,.6)'>proxy raised p</span>"
                 "<span style='background:rgba(220,40,40,.6)'>proxy lowered p</span>"
                 "<span style='text-decoration:underline 2px'>top token differs from base</span></p>")
    for trace in traces:
        parts.append(f"<h2>{html.escape(trace['label'])}</h2><div class='prompt'>{html.escape(trace['prompt'])}</div>"
                     "<div class='output'>")
        for token in trace["tokens"]:
            value = token["chosen"]["proxy"] - token["chosen"]["base"]
            changed = " changed" if token["top_id"]["proxy"] != token["top_id"]["base"] else ""
            parts.append(f"<span class='tok{changed}' style='background:{_colour(value)}'>"
                         f"{html.escape(token['piece'])}<span class='tip'>{_tip(token)}</span></span>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_page(traces: list[dict], summary_lines: list[str], path: Path) -> Path:
    Path(path).write_text(render(traces, summary_lines), encoding="utf-8")
    return Path(path)
