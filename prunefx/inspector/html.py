"""``Inspector.to_html``: one self-contained HTML page (no network, no external files).

Content, top to bottom: the totals; the graph picture (inline SVG from Graphviz, nodes
coloured by channel group, pinned groups grey with a dashed red border, approximate ones
with an amber border) beside a details panel; the reasons table; the groups table; the
layers table. Hovering a node shows its tooltip (SVG ``<title>``); clicking a node, a layer
row or a group row shows its details in the panel and outlines the node(s) in the picture.
Without ``dot`` the page says how to install Graphviz and keeps everything else.

The same markup is used inline (``_repr_html_``, ``fragment=True``): all CSS rules and
element lookups are scoped to one root ``<div>`` with a unique id, so several reports can
share a notebook. When its script has run, the root gets ``data-pfx-ready="1"`` and a hidden
``<span id="prunefx-ready">``; a script error is shown in the page (``id="prunefx-error"``).
"""

from __future__ import annotations

import html
import json
import uuid
from typing import TYPE_CHECKING, Any

from prunefx.inspector.graphviz import (
    APPROX_BORDER,
    PINNED_BORDER,
    PINNED_FILL,
    group_colors,
    render_svg,
)
from prunefx.inspector.render import format_shape, human, human_bytes

if TYPE_CHECKING:
    from prunefx.inspector.report import Inspector

__all__ = ["page"]

_CSS = """
#ROOT { font: 13px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328; }
#ROOT h1 { font-size: 20px; margin: 4px 0 8px; }
#ROOT h2 { font-size: 15px; margin: 18px 0 6px; }
#ROOT .pfx-cards { display: flex; flex-wrap: wrap; gap: 8px; margin-bottom: 10px; }
#ROOT .pfx-card { border: 1px solid #d0d7de; border-radius: 6px; padding: 4px 10px; background: #f6f8fa; }
#ROOT .pfx-card b { display: block; font-size: 15px; }
#ROOT .pfx-main { display: flex; gap: 10px; align-items: flex-start; }
#ROOT .pfx-graph { flex: 1; min-width: 0; max-height: 78vh; overflow: auto; border: 1px solid #d0d7de; border-radius: 6px; padding: 6px; background: #fff; }
#ROOT .pfx-graph svg { display: block; }
#ROOT .pfx-graph g.node { cursor: pointer; }
#ROOT .pfx-graph g.node.pfx-hl path, #ROOT .pfx-graph g.node.pfx-hl polygon { stroke: #0969da; stroke-width: 3px; }
#ROOT .pfx-graph g.node.pfx-sel path, #ROOT .pfx-graph g.node.pfx-sel polygon { stroke: #cf222e; stroke-width: 4px; }
#ROOT .pfx-panel { width: 360px; flex: none; position: sticky; top: 6px; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 10px; background: #f6f8fa; max-height: 78vh; overflow: auto; }
#ROOT .pfx-panel h3 { margin: 0 0 6px; font-size: 14px; word-break: break-all; }
#ROOT .pfx-panel dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 8px; margin: 0; }
#ROOT .pfx-panel dt { color: #57606a; }
#ROOT .pfx-panel dd { margin: 0; word-break: break-word; }
#ROOT .pfx-notice { border: 1px solid #d4a72c; background: #fff8c5; border-radius: 6px; padding: 8px 10px; }
#ROOT .pfx-legend { display: flex; flex-wrap: wrap; gap: 14px; margin: 6px 0; color: #57606a; }
#ROOT .pfx-sw { display: inline-block; width: 14px; height: 10px; border-radius: 3px; border: 1px solid #555; vertical-align: middle; margin-right: 4px; }
#ROOT table { border-collapse: collapse; font-size: 12px; }
#ROOT th, #ROOT td { border-bottom: 1px solid #eaeef2; padding: 2px 8px; text-align: left; vertical-align: top; }
#ROOT th { background: #f6f8fa; position: sticky; top: 0; }
#ROOT td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
#ROOT tr[data-node], #ROOT tr[data-group] { cursor: pointer; }
#ROOT tr[data-node]:hover, #ROOT tr[data-group]:hover { background: #ddf4ff; }
#ROOT .pfx-prunable { color: #1a7f37; } #ROOT .pfx-approximate { color: #9a6700; } #ROOT .pfx-pinned { color: #cf222e; }
#ROOT .pfx-scroll { max-height: 60vh; overflow: auto; border: 1px solid #d0d7de; border-radius: 6px; }
#ROOT input.pfx-search { width: 100%; box-sizing: border-box; margin-bottom: 6px; padding: 3px 6px; }
#ROOT .pfx-error { color: #cf222e; white-space: pre-wrap; }
"""

_JS = r"""
(function () {
  var root = document.getElementById(ROOT_ID);
  try {
    var data = JSON.parse(document.getElementById(ROOT_ID + "-data").textContent);
    var body = root.querySelector(".pfx-panel-body");
    var graph = root.querySelector(".pfx-graph");
    function esc(s) { return String(s).replace(/[&<>"]/g, function (c) { return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
    function el(name) { return root.querySelector('g[id="n_' + name.replace(/["\\]/g, "\\$&") + '"]'); }
    function clear() {
      root.querySelectorAll("g.pfx-hl, g.pfx-sel").forEach(function (g) { g.classList.remove("pfx-hl", "pfx-sel"); });
    }
    function dl(pairs) {
      return "<dl>" + pairs.filter(function (p) { return p[1] !== null && p[1] !== "" && p[1] !== undefined; })
        .map(function (p) { return "<dt>" + esc(p[0]) + "</dt><dd>" + p[1] + "</dd>"; }).join("") + "</dl>";
    }
    function groupLink(name) {
      var g = data.groups[name];
      return '<a href="#" data-show-group="' + esc(name) + '">' + esc(name) + "</a>" + (g ? ' <span class="pfx-' + g.state + '">' + g.state + "</span>" : "");
    }
    function bind() {
      body.querySelectorAll("[data-show-group]").forEach(function (a) {
        a.addEventListener("click", function (ev) { ev.preventDefault(); showGroup(a.getAttribute("data-show-group")); });
      });
      body.querySelectorAll("[data-show-node]").forEach(function (a) {
        a.addEventListener("click", function (ev) { ev.preventDefault(); showNode(a.getAttribute("data-show-node")); });
      });
    }
    function nodeLink(name) { return '<a href="#" data-show-node="' + esc(name) + '">' + esc(name) + "</a>"; }
    function showNode(name) {
      var d = data.nodes[name];
      if (!d) { return; }
      clear();
      var g = el(name);
      if (g) { g.classList.add("pfx-sel"); g.scrollIntoView({block: "center", inline: "center"}); }
      body.innerHTML = "<h3>" + esc(d.label) + "</h3>" + dl([
        ["node", esc(name)], ["op", esc(d.op + " " + d.target)], ["kind", esc(d.kind)],
        ["inputs", d.inputs.map(function (i) { return nodeLink(i[0]) + " " + esc(i[1]); }).join("<br>")],
        ["output", esc(d.shape)], ["channels", d.channels === null ? "-" : esc(d.channels)],
        ["params", esc(d.params)], ["FLOPs", esc(d.flops)], ["activation", esc(d.memory)],
        ["groups", d.groups.map(groupLink).join("<br>")], ["source", d.source ? "<code>" + esc(d.source) + "</code>" : null]
      ]);
      bind();
    }
    function showGroup(name) {
      var d = data.groups[name];
      if (!d) { return; }
      clear();
      var first = null;
      d.nodes.forEach(function (n) { var g = el(n); if (g) { g.classList.add("pfx-hl"); first = first || g; } });
      if (first) { first.scrollIntoView({block: "center", inline: "center"}); }
      body.innerHTML = "<h3>group " + esc(name) + "</h3>" + dl([
        ["state", '<span class="pfx-' + d.state + '">' + d.state + "</span>"], ["size", esc(d.size)],
        ["reason", d.reason ? esc(d.reason) : null], ["FLOPs share", esc(d.share)],
        ["members", esc(d.members)], ["modules", d.modules.map(esc).join("<br>")],
        ["nodes", d.nodes.length + " outlined in the picture"]
      ]);
      bind();
    }
    root.querySelectorAll(".pfx-graph g.node").forEach(function (g) {
      g.addEventListener("click", function () { showNode(g.id.slice(2)); });
    });
    root.querySelectorAll("tr[data-node]").forEach(function (tr) {
      tr.addEventListener("click", function () { showNode(tr.getAttribute("data-node")); });
    });
    root.querySelectorAll("tr[data-group]").forEach(function (tr) {
      tr.addEventListener("click", function () { showGroup(tr.getAttribute("data-group")); });
    });
    var search = root.querySelector("input.pfx-search");
    function find(q) {  // a node, a module ("layer1.0.conv3"), "group:NAME", then any substring
      if (q.indexOf("group:") === 0 && data.groups[q.slice(6)]) { return showGroup(q.slice(6)); }
      if (data.nodes[q]) { return showNode(q); }
      var keys = Object.keys(data.nodes);
      var hit = keys.find(function (k) { return data.nodes[k].label === q; });
      if (hit) { return showNode(hit); }
      if (data.groups[q]) { return showGroup(q); }
      hit = keys.find(function (k) { return k.indexOf(q) >= 0 || data.nodes[k].label.indexOf(q) >= 0; });
      if (hit) { showNode(hit); }
    }
    search.addEventListener("keydown", function (ev) { if (ev.key === "Enter") { find(search.value.trim()); } });
    if (location.hash.length > 1) { find(decodeURIComponent(location.hash.slice(1))); }  // page.html#layer1.0.conv3
    root.setAttribute("data-pfx-ready", "1");
    var mark = document.createElement("span");
    mark.id = "prunefx-ready";
    mark.hidden = true;
    root.appendChild(mark);
  } catch (err) {
    var pre = document.createElement("pre");
    pre.id = "prunefx-error";
    pre.className = "pfx-error";
    pre.textContent = "prunefx inspector script error: " + err;
    root.insertBefore(pre, root.firstChild);
    throw err;
  }
})();
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _data(report: Inspector) -> dict[str, Any]:
    shapes = {r.name: r.output_shape for r in report.layers}
    nodes = {
        r.name: {
            "label": r.label, "op": r.op, "target": r.target, "kind": r.kind,
            "inputs": [[i, format_shape(shapes.get(i))] for i in r.inputs], "shape": format_shape(r.output_shape),
            "channels": r.channels, "params": f"{r.params:,}", "flops": f"{r.flops:,} ({human(r.flops)})",
            "memory": human_bytes(r.memory), "groups": list(r.groups), "source": r.source,
        }
        for r in report.layers
    }
    members: dict[str, list[str]] = {}
    for r in report.layers:
        for g in r.groups:
            members.setdefault(g, []).append(r.name)
    groups = {
        g.name: {
            "size": g.size, "state": g.state, "reason": g.reason, "share": f"{g.flops_share:.1%}",
            "members": len(g.members), "modules": list(g.modules[:40]) + ([f"… {len(g.modules) - 40} more"] if len(g.modules) > 40 else []),
            "nodes": members.get(g.name, []),
        }
        for g in report.groups
    }
    return {"nodes": nodes, "groups": groups}


def _cards(report: Inspector) -> str:
    t = report.totals
    cards = [
        ("parameters", human(t.params)), ("FLOPs", human(t.flops)), ("activations", human_bytes(t.memory)),
        ("nodes / layers", f"{t.nodes} / {t.layers}"), ("groups", str(t.groups)),
        ("prunable", f"{t.exact}"), ("approximate", f"{t.prunable - t.exact}"), ("pinned", f"{t.pinned}"),
        ("prunable channels", f"{t.prunable_channels:,} / {t.channels:,}"),
    ]
    return '<div class="pfx-cards">' + "".join(f'<div class="pfx-card">{_e(k)}<b>{_e(v)}</b></div>' for k, v in cards) + "</div>"


def _picture(report: Inspector, timeout: float) -> str:
    svg = render_svg(report.to_dot(), timeout=timeout)
    if svg.svg is None:
        return f'<div class="pfx-notice"><b>No graph picture.</b> {_e(svg.problem)}. The tables below are complete.</div>'
    return svg.svg


def _legend() -> str:
    return (
        '<div class="pfx-legend"><span>fill colour = channel group (click a node for details, a group row to outline it)</span>'
        f'<span><span class="pfx-sw" style="background:{PINNED_FILL};border:1.5px dashed {PINNED_BORDER}"></span>pinned</span>'
        f'<span><span class="pfx-sw" style="background:#fff;border:2px solid {APPROX_BORDER}"></span>approximate</span>'
        '<span><span class="pfx-sw" style="background:#fff"></span>no tracked channels</span></div>'
    )


def _reasons(report: Inspector) -> str:
    by: dict[str, list[str]] = {}
    for g in report.groups:
        if g.reason:
            by.setdefault(g.reason, []).append(g.name)
    if not by:
        return ""
    rows = "".join(
        f"<tr><td>{_e(', '.join(names[:6]) + (f' +{len(names) - 6}' if len(names) > 6 else ''))}</td><td>{_e(reason)}</td></tr>"
        for reason, names in by.items()
    )
    return f"<h2>Why groups are pinned or approximate</h2><table><tr><th>groups</th><th>reason</th></tr>{rows}</table>"


def _groups(report: Inspector) -> str:
    colors = group_colors(list(report.groups))
    rows = "".join(
        f'<tr data-group="{_e(g.name)}"><td><span class="pfx-sw" style="background:{colors[g.name]}"></span>{_e(g.name)}</td>'
        f'<td class="n">{g.size}</td><td class="pfx-{g.state}">{g.state}</td><td class="n">{len(g.members)}</td>'
        f'<td class="n">{len(g.modules)}</td><td class="n">{g.flops_share:.1%}</td><td>{_e(g.reason or "")}</td></tr>'
        for g in report.groups
    )
    head = "<tr><th>group</th><th>size</th><th>state</th><th>members</th><th>modules</th><th>FLOPs share</th><th>reason</th></tr>"
    return f'<h2>Channel groups ({len(report.groups)})</h2><div class="pfx-scroll"><table>{head}{rows}</table></div>'


def _layers(report: Inspector) -> str:
    rows = []
    for r in report.layers:
        if not r.is_tensor:
            continue
        first_in = next((s for s in r.input_shapes if s is not None), None)
        rows.append(
            f'<tr data-node="{_e(r.name)}"><td>{_e(r.label)}</td><td>{_e(r.kind)}</td><td>{_e(format_shape(first_in))}</td>'
            f'<td>{_e(format_shape(r.output_shape))}</td><td class="n">{"-" if r.channels is None else r.channels}</td>'
            f'<td class="n">{human(r.params) if r.params else ""}</td><td class="n">{human(r.flops) if r.flops else ""}</td>'
            f'<td class="n">{human_bytes(r.memory)}</td><td>{_e(", ".join(r.groups))}</td></tr>'
        )
    head = ("<tr><th>layer</th><th>op</th><th>input</th><th>output</th><th>ch</th><th>params</th><th>FLOPs</th>"
            "<th>act.</th><th>group</th></tr>")
    return f'<h2>Layers ({len(rows)})</h2><div class="pfx-scroll"><table>{head}{"".join(rows)}</table></div>'


def page(report: Inspector, *, fragment: bool = False, timeout: float = 120.0) -> str:
    """The inspector page; ``fragment`` gives the inner ``<div>`` only (for notebooks)."""
    root = f"pfx-{uuid.uuid4().hex[:10]}"
    data = json.dumps(_data(report), separators=(",", ":")).replace("</", "<\\/")
    title = f"prunefx inspect: {report.name}"
    body = (
        f'<div class="pfx" id="{root}"><style>{_CSS.replace("#ROOT", "#" + root)}</style>'
        f"<h1>{_e(title)}</h1>{_cards(report)}{_legend()}"
        f'<div class="pfx-main"><div class="pfx-graph">{_picture(report, timeout)}</div>'
        '<aside class="pfx-panel"><input class="pfx-search" placeholder="find a node, module or group:NAME (Enter)">'
        '<div class="pfx-panel-body">Click a node in the picture, or a row of the tables below.</div></aside></div>'
        f"{_reasons(report)}{_groups(report)}{_layers(report)}"
        f'<script type="application/json" id="{root}-data">{data}</script>'
        f"<script>{_JS.replace('ROOT_ID', json.dumps(root))}</script></div>"
    )
    if fragment:
        return body
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"></head><body>{body}</body></html>\n')


