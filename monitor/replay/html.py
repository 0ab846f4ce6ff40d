"""The HTML forensic report of ``inferwatch replay``: one self-contained page rendered from the JSON
report (docs/replay-report.md) alone, the same report giving the same bytes.

The tables (header, models, suspicious clients, playbook decisions) are rendered here and escaped, so
they read and print without a script. The timeline and the plots are drawn in the browser by the inline
script, into inline SVG, from the report embedded as JSON. Nothing leaves the file: no font, stylesheet,
script or image is fetched, and the Content-Security-Policy forbids any load and allows only this
script (by its hash). Detection summaries and client ids come from the monitored traffic: they are
untrusted text, escaped here and set with ``textContent`` there.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from html import escape
from typing import Any

# The plots of one model's series, in the order they are shown: (series name, caption if it has no label).
PLOTS = (("drift", "drift statistic"), ("low_confidence_rate", "low-confidence rate"),
         ("client_risk", "client risk"), ("latency_ms", "latency (ms)"))

# Step states that need a word for a reader who did not write the engine.
STEP_STATE_MEANING = {"dry_run": "would have run", "skipped": "not run", "refused": "refused by a check"}


def render(report: dict[str, Any]) -> str:
    """The forensic report as one HTML page: header, models, timeline, plots, clients, playbooks."""
    # `<` appears only inside JSON strings, where \u003c means the same: no `</script>` and no `<!--`
    # in the data can end the element or change how the browser parses it.
    data = json.dumps(report, sort_keys=True, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c")
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; img-src data:; script-src 'sha256-{script_hash}'"
    models = _model_names(report)
    first, last = (report.get("time_range") or {}).get("first"), (report.get("time_range") or {}).get("last")
    return "".join([
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n<link rel="icon" href="data:,">\n',
        f"<title>InferWatch replay {_utc(first)} to {_utc(last)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n",
        _header(report),
        _models(report, models),
        '<section id="timeline"><h2>Timeline of detections</h2>'
        '<div class="timeline" data-timeline></div></section>\n',
        _plots(report, models),
        _clients(report),
        _incidents(report),
        f'<script type="application/json" id="report-data">{data}</script>\n',
        f"<script>{_SCRIPT}</script>\n</body>\n</html>\n",
    ])


def _model_names(report: dict[str, Any]) -> list[str]:
    names = set(report.get("models") or {}) | set(report.get("series") or {})
    names |= {str(d["model"]) for d in report.get("detections") or [] if d.get("model") is not None}
    return sorted(names)


def _utc(ts: float | None) -> str:
    """RFC 3339 in UTC, to the millisecond; "—" for not known."""
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _time(ts: float | None) -> str:
    return f"<time>{_utc(ts)}</time>"


def _bound(value: Any) -> str:
    """A replay bound: an event time, or offsets per partition."""
    if isinstance(value, dict):
        return "offsets " + _e(", ".join(f"{p}:{o}" for p, o in sorted(value.items())))
    return _time(value)


def _e(value: Any) -> str:
    return "—" if value is None else escape(str(value))


def _counts(mapping: dict[str, Any] | None) -> str:
    return ", ".join(f"{_e(k)}: {_e(v)}" for k, v in sorted((mapping or {}).items())) or "none"


def _json(value: Any) -> str:
    return f"<code>{_e(json.dumps(value, sort_keys=True, ensure_ascii=False))}</code>"


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """A table of cells that are already HTML (escaped by the caller)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>\n'


def _facts(pairs: list[tuple[str, str]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>\n"


def _header(report: dict[str, Any]) -> str:
    config, playbooks = report.get("config") or {}, report.get("playbooks") or {}
    events, filters = report.get("events") or {}, report.get("filters") or {}
    time_range = report.get("time_range") or {}
    facts = _facts([
        ("tool", f"{_e(report.get('tool'))} (report format {_e(report.get('format'))})"),
        ("config", f"{_e(config.get('path'))}<br><code class=hash>sha256 {_e(config.get('sha256'))}</code>"
                   f"<br><code class=hash>effective sha256 {_e(config.get('effective_sha256'))}</code>"),
        ("playbooks", f"{_e(playbooks.get('path'))} loaded: {_e(', '.join(playbooks.get('loaded') or []) or 'none')}"
                      f"<br><code class=hash>sha256 {_e(playbooks.get('sha256'))}</code>"),
        ("time range (UTC)", f"{_time(time_range.get('first'))} to {_time(time_range.get('last'))}"),
        ("filters", f"from {_bound(filters.get('from'))}, to {_bound(filters.get('to'))}, "
                    f"models: {_e(', '.join(filters.get('models') or []) or 'all')}, "
                    f"clients: {_e(', '.join(filters.get('clients') or []) or 'all')}"),
        ("events", ", ".join(f"{name.replace('_', ' ')}: {_e(events.get(name))}" for name in
                             ("read", "filtered_out", "not_watched", "processed", "dead_lettered"))),
        ("dead letters by reason", _counts(events.get("dead_letter_reasons"))),
    ])
    rows = []
    for source in report.get("inputs") or []:
        if source.get("kind") == "kafka":
            where = f"topic {_e(source.get('topic'))} at {_e(source.get('bootstrap'))}"
            size = f"{_e(source.get('records'))} records<br>" + "<br>".join(
                f"partition {_e(p)}: offsets {_e(o.get('first_offset'))}–{_e(o.get('last_offset'))} "
                f"({_e(o.get('records'))} records)" for p, o in sorted((source.get("partitions") or {}).items()))
        else:
            where, size = _e(source.get("path")), f"{_e(source.get('bytes'))} bytes"
        rows.append([_e(source.get("kind")), where, size, f"<code class=hash>{_e(source.get('sha256'))}</code>"])
    inputs = _table(["kind", "source", "size", "sha256"], rows) if rows else '<p class="note">No inputs.</p>'
    return (f'<header><h1>InferWatch replay: forensic report</h1>{facts}'
            f"<h3>Inputs (chain of custody)</h3>{inputs}</header>\n")


def _models(report: dict[str, Any], models: list[str]) -> str:
    rows = []
    for name in models:
        m = (report.get("models") or {}).get(name) or {}
        rows.append([f"<b>{_e(name)}</b>", _e(m.get("events")), _time(m.get("first_ts")), _time(m.get("last_ts")),
                     _counts(m.get("versions")), _e(m.get("clients")), _counts(m.get("detections")),
                     _counts(m.get("detectors"))])
    table = _table(["model", "events", "first (UTC)", "last (UTC)", "versions", "clients", "detections",
                    "detectors"], rows) if rows else '<p class="note">No models.</p>'
    return f'<section id="models"><h2>Models</h2>{table}</section>\n'


def _plots(report: dict[str, Any], models: list[str]) -> str:
    out = ['<section id="plots"><h2>Over time</h2>']
    for model in models:
        series = (report.get("series") or {}).get(model) or {}
        out.append(f"<h3>{_e(model)}</h3>")
        if not series.get("t"):
            out.append('<p class="note">No series for this model.</p>')
            continue
        out.append('<div class="plots">')
        for name, caption in PLOTS:
            if series.get(name):
                out.append(f'<figure class="plot" data-plot="{_e(model)}:{name}">'
                           f"<figcaption>{_e(series[name].get('label') or caption)}</figcaption></figure>")
        out.append("</div>")
        absent = [caption for name, caption in PLOTS if not series.get(name)]
        if absent:
            out.append(f'<p class="note">Not recorded for this model: {", ".join(absent)}.</p>')
    return "".join(out) + "</section>\n"


def _clients(report: dict[str, Any]) -> str:
    out = ['<section id="clients"><h2>Suspicious clients</h2>']
    for c in report.get("suspicious_clients") or []:
        evidence = "".join(
            f"<li>{_time(ev.get('ts'))} <b>{_e(ev.get('kind'))}</b>: {_e(ev.get('summary'))}"
            + (f"<details><summary>evidence</summary>{_json(ev['evidence'])}</details>" if ev.get("evidence") else "")
            + "</li>" for ev in c.get("evidence") or [])
        out.append(
            f'<article class="client"><h3>client <span class="id">{_e(c.get("client_id"))}</span> on '
            f'{_e(c.get("model"))} <span class="sev sev-{_e(c.get("severity"))}">{_e(c.get("severity"))}</span></h3>'
            + _facts([("kinds", _e(", ".join(c.get("kinds") or []))), ("detections", _e(c.get("detections"))),
                      ("first seen", _time(c.get("first_ts"))), ("last seen", _time(c.get("last_ts"))),
                      ("MITRE ATLAS", _e(", ".join(c.get("atlas") or []) or "none")),
                      ("highest risk", _e(c.get("max_risk")))])
            + (f"<ol class=evidence>{evidence}</ol>" if evidence else "") + "</article>")
    if len(out) == 1:
        out.append('<p class="note">No suspicious clients.</p>')
    return "".join(out) + "</section>\n"


def _incidents(report: dict[str, Any]) -> str:
    out = ['<section id="incidents"><h2>Playbook decisions</h2>'
           '<p class="note">A step in state dry_run would have run; the replay did not run it.</p>']
    for inc in report.get("incidents") or []:
        trigger = inc.get("detection") or {}
        steps = [[_e(s.get("id")), _e(s.get("action")), "yes" if s.get("destructive") else "no",
                  f'<span class="state state-{_e(s.get("state"))}">{_e(s.get("state"))}</span> '
                  f'{STEP_STATE_MEANING.get(s.get("state"), "")}',
                  "—" if s.get("params") is None else _json(s.get("params"))] for s in inc.get("steps") or []]
        out.append(
            f'<article class="incident"><h3>{_e(inc.get("playbook"))} · <span class="id">{_e(inc.get("key"))}</span> '
            f'<span class="state">{_e(inc.get("state"))}</span></h3>'
            + _facts([("incident", f"<code>{_e(inc.get('id'))}</code>"), ("opened", _time(inc.get("opened_at"))),
                      ("closed", _time(inc.get("closed_at"))), ("detections", _e(inc.get("detections"))),
                      ("opened by", f"{_e(trigger.get('kind'))} on {_e(trigger.get('model'))}, client "
                                    f"<span class=id>{_e(trigger.get('client_id'))}</span> "
                                    f"<code>{_e(trigger.get('detection_id'))}</code>")])
            + (_table(["step", "action", "destructive", "state", "parameters (rendered)"], steps, "steps")
               if steps else '<p class="note">No steps.</p>') + "</article>")
    if len(out) == 1:
        out.append('<p class="note">No incidents.</p>')
    return "".join(out) + "</section>\n"


_STYLE = """
:root { --fg: #1d2329; --muted: #5b6570; --line: #d8dde3; }
body { font: 14px/1.45 system-ui, "DejaVu Sans", sans-serif; color: var(--fg); max-width: 1320px;
       margin: 0 auto; padding: 12px 24px 40px; }
h1 { font-size: 22px; margin: 4px 0 8px; }
h2 { font-size: 18px; border-bottom: 2px solid var(--line); padding-bottom: 3px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 14px 0 6px; }
table { border-collapse: collapse; width: 100%; margin: 4px 0; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f1f3f6; font-weight: 600; }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 4px 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.note { color: var(--muted); font-style: italic; margin: 4px 0; }
.notice { background: #fff4d6; border: 1px solid #e8a202; padding: 3px 8px; margin: 4px 0; }
.id { font-family: ui-monospace, "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
.sev { padding: 0 6px; border-radius: 3px; color: #fff; font-size: 12px; font-weight: 600; }
.sev-critical { background: #d62728; } .sev-warning { background: #c98a00; } .sev-info { background: #4c78a8; }
.state { padding: 0 5px; border-radius: 3px; background: #eceff3; font-size: 12px; }
.state-dry_run { background: #dbe9f8; } .state-done { background: #d9f2dc; }
.state-failed, .state-refused { background: #f8d7d7; } .state-skipped { color: var(--muted); }
article { border: 1px solid var(--line); border-radius: 4px; padding: 2px 12px 8px; margin: 10px 0; }
ol.evidence { margin: 4px 0; padding-left: 22px; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); gap: 10px; }
figure.plot { margin: 0; border: 1px solid var(--line); border-radius: 4px; padding: 6px 8px; }
figcaption { font-weight: 600; font-size: 13px; }
svg { display: block; width: 100%; height: auto; }
time { white-space: nowrap; }
svg text { font: 11px system-ui, "DejaVu Sans", sans-serif; fill: var(--muted); }
svg .grid { stroke: #eef0f3; } svg .axis { stroke: #9aa3ad; }
.legend { font-size: 12px; color: var(--muted); display: flex; flex-wrap: wrap; gap: 2px 14px; }
.swatch { display: inline-block; width: 18px; margin-right: 5px; vertical-align: middle; border-top: 2px solid; }
.swatch.dashed { border-top-style: dashed; }
@media print {
  body { max-width: none; padding: 0; font-size: 11px; }
  .plots { grid-template-columns: 1fr 1fr; }
  figure.plot, article, tr, .timeline { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
}
"""

_SCRIPT = r"""
"use strict";
const R = JSON.parse(document.getElementById("report-data").textContent);
const NS = "http://www.w3.org/2000/svg";
const SEVERITY = {critical: "#d62728", warning: "#e8a202", info: "#4c78a8"};
const PALETTE = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];
const RULE = {threshold: "#d62728", alarm: "#7b3294", baseline: "#6b7280"};
const MAX_MARKS = 5000;  // marks of the timeline: beyond, detections share wider marks
const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function svg(tag, attrs, parent) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return parent.appendChild(el);
}
function text(tag, content, parent, cls) {
  const el = document.createElement(tag);
  el.textContent = content;
  if (cls) el.className = cls;
  return parent.appendChild(el);
}
function label(x, y, content, parent, anchor) {
  svg("text", {x: x, y: y, "text-anchor": anchor || "middle"}, parent).textContent = content;
}
const isNum = v => typeof v === "number" && isFinite(v);
const pad2 = n => String(n).padStart(2, "0");
function utc(ts, step, span) {
  const d = new Date(ts * 1000);
  if (step >= 86400) return d.toISOString().slice(0, 10);
  const hm = pad2(d.getUTCHours()) + ":" + pad2(d.getUTCMinutes()) + (step < 60 ? ":" + pad2(d.getUTCSeconds()) : "");
  return span > 86400 ? pad2(d.getUTCMonth() + 1) + "-" + pad2(d.getUTCDate()) + " " + hm : hm;
}
function timeTicks(t0, t1, n) {
  const span = t1 - t0;
  const step = TIME_STEPS.find(s => span / s <= n) || Math.ceil(span / n / 86400) * 86400;
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return {step: step, ticks: ticks, span: span};
}
function valueTicks(lo, hi, n) {
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(10));
  return ticks;
}
function timeDomain(times) {
  const tr = R.time_range || {};
  let t0 = Infinity, t1 = -Infinity;  // no spread: a report can hold more times than a call takes arguments
  for (const t of times.concat([tr.first, tr.last])) if (isNum(t)) { t0 = Math.min(t0, t); t1 = Math.max(t1, t); }
  if (t0 > t1) { t0 = 0; t1 = 1; }
  if (t1 - t0 < 1) { t0 -= 30; t1 += 30; }  // one point: a minute around it
  const margin = (t1 - t0) * 0.01;  // points at the ends stay off the axes
  return [t0 - margin, t1 + margin];
}
// The time axis at the bottom of a plot area [left, right] x [top, bottom], with its UTC labels.
function timeAxis(g, x, t0, t1, top, bottom, n) {
  const tt = timeTicks(t0, t1, n);
  for (const t of tt.ticks) {
    svg("line", {x1: x(t), x2: x(t), y1: top, y2: bottom, class: "grid"}, g);
    label(x(t), bottom + 14, utc(t, tt.step, tt.span), g, x(t) > x(t1) - 24 ? "end" : "middle");
  }
  label(x(t1), bottom + 28, "time (UTC) from " + new Date(tt.ticks.length ? tt.ticks[0] * 1000 : t0 * 1000).toISOString().slice(0, 10), g, "end");
}
function legend(parent, items) {
  const box = text("div", "", parent, "legend");
  for (const it of items) {
    const item = text("span", "", box);
    const sw = text("span", "", item, "swatch" + (it.dashed ? " dashed" : ""));
    sw.style.borderTopColor = it.color;
    item.appendChild(document.createTextNode(it.label));
  }
}

// What to draw for each kind of series: lines of values, and horizontal rules (dashed).
const SPECS = {
  drift: s => ({lines: [{label: "statistic", values: s.values}],
                rules: [{label: "threshold", value: s.threshold, color: RULE.threshold}]}),
  low_confidence_rate: s => ({lines: [{label: "low-confidence rate", values: s.values}],
                              rules: [{label: "reference threshold", value: s.threshold, color: RULE.threshold},
                                      {label: "alarm level", value: s.alarm_level, color: RULE.alarm}]}),
  client_risk: s => ({lines: Object.keys(s.clients || {}).map(c => ({label: c, values: s.clients[c]})),
                      rules: [{label: "threshold", value: s.threshold, color: RULE.threshold}]}),
  latency_ms: s => ({lines: [{label: "p50", values: s.p50}, {label: "p95", values: s.p95}],
                     rules: [{label: "baseline median", value: s.baseline_median, color: RULE.baseline},
                             {label: "threshold", value: s.threshold, color: RULE.threshold}]}),
};

// One line with gaps at nulls; a point alone between gaps is a dot. Returns the points drawn.
function drawLine(g, t, values, x, y, color) {
  let drawn = 0, run = [];
  const flush = () => {
    if (run.length === 1) svg("circle", {cx: run[0][0], cy: run[0][1], r: 2.5, fill: color}, g);
    else if (run.length) svg("path", {d: "M" + run.map(p => p[0].toFixed(1) + "," + p[1].toFixed(1)).join("L"),
                                      fill: "none", stroke: color, "stroke-width": 1.5}, g);
    drawn += run.length;
    run = [];
  };
  (values || []).forEach((v, i) => { if (isNum(v) && isNum(t[i])) run.push([x(t[i]), y(v)]); else flush(); });
  flush();
  return drawn;
}

function plot(figure) {
  const key = figure.dataset.plot, cut = key.lastIndexOf(":");
  const series = R.series[key.slice(0, cut)], name = key.slice(cut + 1);
  const spec = SPECS[name](series[name]), t = series.t;
  const rules = spec.rules.filter(r => isNum(r.value));
  const values = spec.lines.flatMap(l => (l.values || []).filter(isNum)).concat(rules.map(r => r.value));
  let lo = Math.min(0, ...values), hi = Math.max(...values, 0);
  if (hi <= lo) hi = lo + 1;
  hi += (hi - lo) * 0.05;
  const [t0, t1] = timeDomain(t.filter(isNum));
  const W = 600, H = 210, L = 48, RT = 10, T = 8, B = 176;
  const x = v => L + (v - t0) / (t1 - t0) * (W - L - RT), y = v => B - (v - lo) / (hi - lo) * (B - T);
  const s = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img"}, figure);
  for (const v of valueTicks(lo, hi, 4)) {
    svg("line", {x1: L, x2: W - RT, y1: y(v), y2: y(v), class: "grid"}, s);
    label(L - 4, y(v) + 4, String(v), s, "end");
  }
  timeAxis(s, x, t0, t1, T, B, 6);
  svg("line", {x1: L, x2: W - RT, y1: B, y2: B, class: "axis"}, s);
  svg("line", {x1: L, x2: L, y1: T, y2: B, class: "axis"}, s);
  const items = [];
  for (const r of rules) {
    svg("line", {x1: L, x2: W - RT, y1: y(r.value), y2: y(r.value), stroke: r.color, "stroke-dasharray": "6 4",
                 "stroke-width": 1.2, class: "rule"}, s);
    items.push({label: r.label + " " + r.value, color: r.color, dashed: true});
  }
  let drawn = 0;
  spec.lines.forEach((l, i) => {
    const color = PALETTE[i % PALETTE.length];
    drawn += drawLine(s, t, l.values, x, y, color);
    items.push({label: l.label, color: color});
  });
  legend(figure, items);
  if (!drawn) text("p", "No values in this range (the detector was still learning, or nothing was measured).", figure, "note");
  figure.dataset.drawn = String(drawn);
}

// One lane per model, three rows per lane (critical on top). Detections in the same row and the same bin
// of time share a mark whose title lists them; bins start at one pixel and widen until there are at most
// MAX_MARKS marks, so every detection keeps a mark however many there are.
function timeline(box) {
  const dets = (R.detections || []).filter(d => isNum(d.ts));
  box.dataset.drawn = "0";
  if (!dets.length) { text("p", "No detections.", box, "note"); return; }
  const models = [...new Set(Object.keys(R.models || {}).concat(Object.keys(R.series || {}), dets.map(d => String(d.model))))].sort();
  const lanes = new Map(models.map((m, i) => [m, i]));
  const rows = ["critical", "warning", "info"], laneH = 40, L = 150, W = 1280, RT = 10, T = 4;
  const B = T + models.length * laneH, H = B + 34;
  const [t0, t1] = timeDomain(dets.map(d => d.ts));
  const x = v => L + (v - t0) / (t1 - t0) * (W - L - RT);
  const s = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img"}, box);
  timeAxis(s, x, t0, t1, T, B, 10);
  models.forEach((m, i) => {
    svg("line", {x1: L, x2: W - RT, y1: T + (i + 1) * laneH, y2: T + (i + 1) * laneH, class: "axis"}, s);
    label(L - 8, T + i * laneH + laneH / 2 + 4, m.length > 22 ? m.slice(0, 21) + "…" : m, s, "end");
  });
  const place = (d, bin) => [lanes.get(String(d.model)), Math.max(0, rows.indexOf(d.severity)), Math.floor((x(d.ts) - L) / bin)];
  let bin = 1;
  while (bin < W && new Set(dets.map(d => place(d, bin).join(":"))).size > MAX_MARKS) bin *= 2;
  const marks = new Map();
  for (const d of dets) {
    const [lane, row, col] = place(d, bin), id = lane + ":" + row + ":" + col;
    let mark = marks.get(id);
    if (!mark) {
      const w = Math.max(4, bin);
      const el = svg("rect", {x: Math.min(L + col * bin + bin / 2 - w / 2, W - RT - w), y: T + lane * laneH + 4 + row * 11, width: w, height: 10,
                              fill: SEVERITY[d.severity] || SEVERITY.info, class: "mark"}, s);
      mark = {el: el, lines: [], n: 0};
      marks.set(id, mark);
    }
    mark.n += 1;
    if (mark.lines.length < 5) {
      mark.lines.push(utc(d.ts, 1, 0) + " " + (d.kind || "?") + " · " + (d.severity || "") + " · client " +
                      (d.client_id == null ? "—" : d.client_id) + "\n" + (d.summary || ""));
    }
  }
  for (const mark of marks.values()) {
    const more = mark.n > mark.lines.length ? "\n… and " + (mark.n - mark.lines.length) + " more here" : "";
    svg("title", {}, mark.el).textContent = mark.lines.join("\n") + more;
  }
  legend(box, rows.map(r => ({label: r, color: SEVERITY[r]})));
  if (bin > 1) {
    const seconds = (bin * (t1 - t0) / (W - L - RT)).toPrecision(2);
    text("p", dets.length + " detections are shown as " + marks.size + " marks (at most " + MAX_MARKS +
         "): each mark holds the detections of one model and severity within " + seconds + " s; its tooltip lists the first five. " +
         "All detections are in the embedded JSON report (script#report-data).", box, "notice");
  }
  box.dataset.drawn = String(dets.length);
  box.dataset.marks = String(marks.size);
}

timeline(document.querySelector("[data-timeline]"));
document.querySelectorAll("[data-plot]").forEach(figure => {
  try { plot(figure); } catch (err) { text("p", "This plot could not be drawn.", figure, "note"); console.error(err); }
});
window.addEventListener("beforeprint", () => document.querySelectorAll("details").forEach(d => { d.open = true; }));
"""
