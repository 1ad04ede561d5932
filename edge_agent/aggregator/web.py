"""The aggregator's read-only HTTP endpoint: a status page, its JSON and Prometheus metrics.

- ``/``            the status page: devices online and when each was last heard from, the rounds, an
                   accuracy-per-round chart (inline SVG drawn by the page's own script; no CDN, no build)
- ``/api/status``  the page's data (:meth:`FleetView.snapshot`) as JSON
- ``/metrics``     Prometheus text format (when metrics are on)

Standard library only (http.server in one daemon thread, one short-lived thread per request). Nothing
here changes the aggregator: every other method is 405. It binds loopback unless told otherwise; put a
reverse proxy with authentication in front before exposing it.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .metrics import Metrics
from .view import FleetView

log = logging.getLogger("edge_fl.aggregator.http")

DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``port`` (loopback); ``[::1]:port`` for IPv6."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or DEFAULT_HOST
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"HTTP address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9465")
    return host, int(port)


class StatusServer:
    """Serves `view` and `metrics` on `address` (``host:port``) from a daemon thread."""

    def __init__(self, address: str, view: FleetView, metrics: Metrics) -> None:
        self.view, self.metrics = view, metrics
        host, port = parse_address(address)
        try:
            self.httpd = _Server((host, port), _Handler)
        except OSError as exc:
            raise OSError(f"cannot serve the status page on {host}:{port}: {exc.strerror or exc}; "
                          f"choose another [aggregator] http address or --http") from exc
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="edge-fl-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}"

    def start(self) -> None:
        self.thread.start()
        log.info("status page at %s/ (JSON at /api/status, metrics at /metrics)", self.url)

    def close(self) -> None:
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow client never holds up the aggregator's shutdown
    owner: StatusServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "edge-fl"

    @property
    def owner(self) -> StatusServer:
        return self.server.owner

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
                                                    "style-src 'unsafe-inline'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, PAGE.encode(), "text/html; charset=utf-8")
        elif path == "/api/status":
            body = json.dumps(self.owner.view.snapshot(), allow_nan=False).encode()
            self._send(200, body, "application/json")
        elif path == "/metrics" and (exposition := self.owner.metrics.exposition()) is not None:
            self._send(200, *exposition)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    do_HEAD = do_GET

    def _read_only(self) -> None:
        self._send(405, b"read-only\n", "text/plain; charset=utf-8")

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-fl aggregator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,th:first-child{text-align:left}.off{color:#999}.bad{color:#b00}
#chart{border:1px solid #ddd;background:#fafafa}
</style></head>
<body>
<h1>edge-fl fleet <span id="fleet">…</span></h1>
<p id="summary">loading…</p>
<h2>Accuracy per round</h2>
<svg id="chart" width="640" height="240" viewBox="0 0 640 240" role="img"
 aria-label="mean personalized accuracy per round"></svg>
<h2>Rounds</h2>
<table id="rounds"><thead><tr><th>round</th><th>outcome</th><th>reported / selected</th><th>rejected</th>
<th>bytes in</th><th>duration s</th><th>personal acc %</th><th>global acc %</th></tr></thead><tbody></tbody></table>
<h2>Devices</h2>
<table id="devices"><thead><tr><th>device</th><th>state</th><th>since</th><th>last seen</th></tr></thead>
<tbody></tbody></table>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const pct = v => v === null || v === undefined ? "-" : (100 * v).toFixed(1);
const ago = (now, t) => { const s = Math.max(0, now - t);
  return s < 120 ? s.toFixed(0) + " s ago" : s < 7200 ? (s / 60).toFixed(0) + " min ago"
    : (s / 3600).toFixed(1) + " h ago"; };
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; tr.appendChild(td); }
function svg(name, attrs, text) { const e = document.createElementNS(NS, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]); if (text !== undefined) e.textContent = text; return e; }
function chart(rounds) {
  const el = document.getElementById("chart"); el.replaceChildren();
  const W = 640, H = 240, L = 44, R = 12, T = 12, B = 30, pts = rounds.filter(r => r.personal_acc != null);
  const n = Math.max(1, rounds.length ? rounds[rounds.length - 1].round : 1);
  const x = r => L + (n === 1 ? (W - L - R) / 2 : (r - 1) * (W - L - R) / (n - 1));
  const y = a => T + (1 - a) * (H - T - B);
  for (const a of [0, 0.25, 0.5, 0.75, 1]) {
    el.appendChild(svg("line", {x1: L, x2: W - R, y1: y(a), y2: y(a), stroke: "#ddd"}));
    el.appendChild(svg("text", {x: L - 6, y: y(a) + 4, "text-anchor": "end", "font-size": 11}, (100 * a) + "%"));
  }
  el.appendChild(svg("text", {x: (W + L) / 2, y: H - 6, "text-anchor": "middle", "font-size": 11}, "round"));
  if (!pts.length) { el.appendChild(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty"},
    "no accuracy reported yet")); return; }
  el.appendChild(svg("polyline", {points: pts.map(r => x(r.round) + "," + y(r.personal_acc)).join(" "),
    fill: "none", stroke: "#2a6fdb", "stroke-width": 2, class: "personal"}));
  for (const r of pts) {
    const c = svg("circle", {cx: x(r.round), cy: y(r.personal_acc), r: 4, fill: "#2a6fdb",
      "data-round": r.round, "data-acc": pct(r.personal_acc)});
    c.appendChild(svg("title", {}, "round " + r.round + ": " + pct(r.personal_acc) + " %"));
    el.appendChild(c);
    el.appendChild(svg("text", {x: x(r.round), y: H - B + 14, "text-anchor": "middle", "font-size": 11}, r.round));
  }
}
function render(s) {
  document.getElementById("fleet").textContent = s.fleet;
  const c = s.current;
  document.getElementById("summary").textContent = s.online + " device(s) online; global model version " +
    s.model_version + (c ? "; round " + c.round + " " + c.phase + ", " + c.reported + "/" + c.selected +
    " reported" : "; no round yet");
  const rb = document.querySelector("#rounds tbody"); rb.replaceChildren();
  for (const r of s.rounds.slice().reverse()) {
    const tr = document.createElement("tr"); tr.dataset.round = r.round;
    cell(tr, r.round);
    cell(tr, r.phase !== "closed" ? r.phase : r.succeeded ? "succeeded" : "failed", r.succeeded === false ? "bad" : "");
    cell(tr, (r.reported ?? "-") + " / " + r.selected); cell(tr, r.rejected ?? "-"); cell(tr, r.bytes_in ?? "-");
    cell(tr, r.closed_at ? (r.closed_at - r.opened_at).toFixed(1) : "-");
    cell(tr, pct(r.personal_acc)); cell(tr, pct(r.global_acc)); rb.appendChild(tr);
  }
  const db = document.querySelector("#devices tbody"); db.replaceChildren();
  for (const d of s.devices) {
    const tr = document.createElement("tr"); tr.dataset.device = d.device; if (!d.online) tr.className = "off";
    cell(tr, d.device); cell(tr, d.online ? "online" : "offline"); cell(tr, ago(s.time, d.since));
    cell(tr, ago(s.time, d.last_seen)); db.appendChild(tr);
  }
  chart(s.rounds);
  document.body.dataset.rendered = "1";
}
async function refresh() {
  try { const r = await fetch("api/status", {cache: "no-store"}); render(await r.json()); }
  catch (e) { document.getElementById("summary").textContent = "cannot reach the aggregator: " + e; }
}
refresh(); setInterval(refresh, 5000);
</script>
</body></html>
"""
