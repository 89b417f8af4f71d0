// Service graph of the mesh: polls /api/graph and draws it as SVG and as a
// table. No dependencies; the layout is layered (a node's column is its
// distance from the traffic's sources).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
let selected = null;
let timer = null;

function el(tag, attrs, text) {
  const e = tag === "svg" || ["g", "path", "circle", "text", "title", "marker", "defs"].includes(tag)
    ? document.createElementNS(SVGNS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function fmt(v) {
  if (v === 0) return "0";
  if (v >= 100) return v.toFixed(0);
  if (v >= 1) return v.toFixed(1);
  return v.toFixed(2);
}
function pct(v) { return (100 * v).toFixed(v > 0 && v < 0.01 ? 2 : 1) + "%"; }

function edgeClass(e) {
  if (e.total.denied > 0) return "denied";
  if (e.total.errors > 0) return "err";
  return "ok";
}

function label(n) { return n.name || n.id; }

function edgeLabel(e, interval) {
  const perSec = interval > 0;
  let s = e.protocol === "tcp"
    ? (perSec ? fmt(e.rate.connections) + " conn/s" : e.total.connections + " conn")
    : (perSec ? fmt(e.rate.requests) + " req/s" : e.total.requests + " req");
  if (e.errorRatio > 0) s += " · " + pct(e.errorRatio) + " err";
  if (e.deniedRatio > 0) s += " · " + pct(e.deniedRatio) + " denied";
  return s;
}

// layout places nodes in columns by their longest distance from a source.
function layout(graph, width, height) {
  const depth = {};
  graph.nodes.forEach(n => depth[n.id] = 0);
  for (let i = 0; i < graph.nodes.length; i++) {
    let changed = false;
    for (const e of graph.edges) {
      if (e.source !== e.target && depth[e.target] < depth[e.source] + 1 && depth[e.source] + 1 < graph.nodes.length) {
        depth[e.target] = depth[e.source] + 1; changed = true;
      }
    }
    if (!changed) break;
  }
  const cols = {};
  graph.nodes.forEach(n => (cols[depth[n.id]] = cols[depth[n.id]] || []).push(n));
  const ncols = Object.keys(cols).length;
  graph.columns = ncols;
  const pos = {};
  Object.entries(cols).forEach(([d, nodes], ci) => {
    nodes.forEach((n, i) => {
      pos[n.id] = {
        x: 90 + (ncols > 1 ? ci * (width - 220) / (ncols - 1) : (width - 180) / 2),
        y: (i + 1) * height / (nodes.length + 1),
      };
    });
  });
  return pos;
}

function colWidth(graph, width) {
  return (width - 220) / Math.max(1, graph.columns - 1);
}

function shortID(id) { return id.startsWith("workload:") ? id.slice("workload:".length) : id; }

function drawGraph(graph) {
  const svg = document.getElementById("graph");
  const width = svg.clientWidth || 1000, height = svg.clientHeight || 560;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const defs = el("defs");
  for (const c of [["ok", "#2b8a3e"], ["err", "#e8890c"], ["denied", "#d62828"]]) {
    const m = el("marker", { id: "arrow-" + c[0], viewBox: "0 0 10 10", refX: "10", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" });
    m.appendChild(el("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: c[1] }));
    defs.appendChild(m);
  }
  svg.appendChild(defs);
  const pos = layout(graph, width, height);
  const pairCount = {};
  for (const e of graph.edges) {
    const key = e.source + ">" + e.target;
    const k = pairCount[key] = (pairCount[key] || 0) + 1;
    const a = pos[e.source], b = pos[e.target];
    if (!a || !b) continue;
    const cls = edgeClass(e);
    const g = el("g", {
      class: "edge " + cls + (e.mtls ? "" : " plaintext") + (selected === e.id ? " selected" : ""),
      "data-edge": e.id, "data-source": e.source, "data-target": e.target, "data-protocol": e.protocol,
      "data-via": (e.via || []).join(" "), "data-mtls": String(e.mtls),
    });
    // Curve away from the straight line; a second edge of the same pair
    // (tcp and http) bends the other way.
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    // An edge that skips a column (an L7 edge reported by the waypoint it
    // went through) arcs clear of the nodes in between.
    const skips = Math.abs(dx) > colWidth(graph, width) * 1.5;
    const bend = (k % 2 ? 1 : -1) * ((skips ? 140 : 20) + 25 * Math.floor((k - 1) / 2));
    const r = 22;
    const sx = a.x + dx / len * r, sy = a.y + dy / len * r, tx = b.x - dx / len * r, ty = b.y - dy / len * r;
    const mx = (sx + tx) / 2 - dy / len * bend, my = (sy + ty) / 2 + dx / len * bend;
    g.appendChild(el("path", { d: `M ${sx} ${sy} Q ${mx} ${my} ${tx} ${ty}`, "marker-end": `url(#arrow-${cls})` }));
    // The label sits on the curve's midpoint.
    g.appendChild(el("text", { x: (sx + 2 * mx + tx) / 4, y: (sy + 2 * my + ty) / 4 - 4, "text-anchor": "middle" }, e.protocol + " · " + edgeLabel(e, graph.intervalSeconds)));
    g.appendChild(el("title", {}, tooltip(e)));
    g.addEventListener("click", () => select(e, graph));
    svg.appendChild(g);
  }
  for (const n of graph.nodes) {
    const p = pos[n.id];
    const g = el("g", { class: "node " + n.kind, "data-node": n.id, transform: `translate(${p.x},${p.y})` });
    g.appendChild(el("circle", { r: 20 }));
    g.appendChild(el("text", { y: 36, "text-anchor": "middle" }, label(n)));
    if (n.namespace) g.appendChild(el("text", { y: 49, "text-anchor": "middle", class: "ns" }, n.namespace));
    g.appendChild(el("title", {}, n.kind + " " + n.id));
    svg.appendChild(g);
  }
}

function tooltip(e) {
  return `${e.source} → ${e.target} (${e.protocol})` +
    (e.via && e.via.length ? `\nvia ${e.via.join(", ")}` : "") +
    `\nmTLS: ${e.mtls ? "yes" : "no"}; identity: ${(e.principals || []).join(", ") || "unknown"}` +
    `\npolicies: ${(e.policies || []).map(p => p.namespace + "/" + p.name).join(", ") || "none"}`;
}

function policyLinks(e) {
  const td = el("td");
  for (const p of e.policies || []) {
    const a = el("a", { href: `policy/${encodeURIComponent(p.namespace)}/${encodeURIComponent(p.name)}`, target: "_blank", class: "policy" },
      `${p.namespace}/${p.name} (${p.action})`);
    td.appendChild(a);
    td.appendChild(el("br"));
  }
  if (!td.childNodes.length) td.textContent = "—";
  return td;
}

function drawTable(graph) {
  const body = document.querySelector("#edges tbody");
  body.replaceChildren();
  for (const e of graph.edges) {
    const tr = el("tr", { class: edgeClass(e) + (selected === e.id ? " selected" : ""), "data-edge": e.id });
    const cells = [shortID(e.source), shortID(e.target), e.protocol, (e.via || []).map(shortID).join(", ") || "—",
      fmt(e.rate.requests), fmt(e.rate.connections), pct(e.errorRatio), e.total.denied > 0 ? `${e.total.denied} (${pct(e.deniedRatio)})` : "0",
      (e.mtls ? "mTLS " : "plaintext ") + ((e.principals || []).join(", ") || "")];
    for (const c of cells) tr.appendChild(el("td", {}, String(c)));
    tr.appendChild(policyLinks(e));
    tr.appendChild(el("td", {}, e.protocol === "tcp" ? `${e.total.connections} conn, ${e.total.bytesReceived}/${e.total.bytesSent} B` : `${e.total.requests} req`));
    tr.addEventListener("click", () => select(e, graph));
    body.appendChild(tr);
  }
}

function select(e, graph) {
  selected = e.id;
  const d = document.getElementById("detail");
  d.hidden = false;
  d.replaceChildren(el("b", {}, `${e.source} → ${e.target}`), el("br"),
    el("span", {}, `${e.protocol}, ${edgeLabel(e, graph.intervalSeconds)}`), el("br"),
    el("span", {}, `mTLS: ${e.mtls ? "yes" : "no"} — ${(e.principals || []).join(", ") || "no identity"}`), el("br"),
    el("span", {}, "Policies selecting the destination:"));
  const table = el("table");
  const tr = el("tr");
  tr.appendChild(policyLinks(e));
  table.appendChild(tr);
  d.appendChild(table);
  render(graph);
}

let last = null;
function render(graph) {
  last = graph;
  drawGraph(graph);
  drawTable(graph);
  const errs = document.getElementById("errors");
  errs.replaceChildren(...(graph.errors || []).map(m => el("li", {}, m)));
  document.getElementById("status").textContent =
    `${graph.nodes.length} nodes, ${graph.edges.length} edges · ${graph.targets.length} proxies · ` +
    (graph.intervalSeconds > 0 ? `rates over ${graph.intervalSeconds.toFixed(1)} s · ` : "totals (rates after the next scrape) · ") +
    new Date(graph.at).toLocaleTimeString();
  document.body.dataset.loaded = "true";
}

async function poll() {
  try {
    const r = await fetch("api/graph", { cache: "no-store" });
    if (!r.ok) throw new Error(await r.text());
    render(await r.json());
  } catch (err) {
    document.getElementById("status").textContent = "error: " + err.message;
  }
  if (document.getElementById("live").checked) timer = setTimeout(poll, 3000);
}

function view(name) {
  document.getElementById("graph-view").hidden = name !== "graph";
  document.getElementById("table-view").hidden = name !== "table";
  document.getElementById("show-graph").classList.toggle("active", name === "graph");
  document.getElementById("show-table").classList.toggle("active", name === "table");
  if (last) render(last);
}

document.getElementById("show-graph").addEventListener("click", () => view("graph"));
document.getElementById("show-table").addEventListener("click", () => view("table"));
document.getElementById("live").addEventListener("change", ev => { clearTimeout(timer); if (ev.target.checked) poll(); });
if (location.hash === "#table") view("table");
poll();
