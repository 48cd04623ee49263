// plantsight viewer: each page reads the JSON API under /api/ and draws plain DOM. No build step.
"use strict";

const api = async (path, opts = {}) => {
  const res = await fetch(path, { credentials: "same-origin", ...opts });
  if (res.status === 401) { location.href = "/login?next=" + encodeURIComponent(location.pathname); throw new Error("401"); }
  if (!res.ok) throw new Error(`${path}: ${res.status}`);
  return res.json();
};

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

const fmtTime = (ns) => new Date(ns / 1e6).toLocaleString();
// an operator's verdict on an acknowledged alert (shared/acks.py VERDICTS), as the pages write it
const VERDICT_TEXT = { confirmed: "confirmed", false_alarm: "false alarm" };
const verdictText = (ack) => (ack && ack.verdict ? VERDICT_TEXT[ack.verdict] || ack.verdict : "–");
const fmtValue = (v) => (typeof v === "number" ? (Math.abs(v) >= 100 ? v.toFixed(1) : +v.toFixed(4)) : String(v));

function summaryText(task, s) {
  if (task === "classify") return `${s.label} ${(100 * s.prob).toFixed(0)}%`;
  if (task === "detect") return `${s.count} object(s)`;
  if (task === "segment") return `defects ${(100 * s.defect_ratio).toFixed(2)}% · ${s.regions} region(s)`;
  if (task === "thermal") return `max ${s.max_k} K · avg ${s.avg_k} K · ${s.hotspots} hot spot(s)`;
  return JSON.stringify(s);
}

// --- camera grid -------------------------------------------------------------------------
async function gridPage() {
  const grid = document.getElementById("grid");
  const cards = {};
  const refresh = async () => {
    for (const cam of await api("/api/cameras")) {
      let card = cards[cam.id];
      if (!card) {
        // One MJPEG stream per camera would hold a connection each, and a browser opens at most six per
        // host over HTTP/1.1: the seventh camera and every API call would wait forever. Poll frame.jpg.
        const img = el("img", { class: "live", alt: `camera ${cam.id}` });
        const next = (ms) => setTimeout(() => { img.src = `/api/cameras/${encodeURIComponent(cam.id)}/frame.jpg?t=${Date.now()}`; }, ms);
        img.addEventListener("load", () => next(250));
        img.addEventListener("error", () => next(2000));
        next(0);
        card = cards[cam.id] = el("a", { class: "card", href: `/cameras/${encodeURIComponent(cam.id)}`, "data-camera": cam.id },
          img, el("div", { class: "caption" }));
        grid.append(card);
      }
      const cap = card.querySelector(".caption");
      cap.replaceChildren(
        el("span", { class: cam.up ? "up" : "down", text: cam.up ? "● up" : "● down" }),
        el("b", { text: ` ${cam.id} ` }), el("span", { text: `${cam.fps} fps` }),
        ...Object.entries(cam.latest).map(([t, s]) => el("div", { class: "small", text: `${t}: ${summaryText(t, s)}` })));
    }
  };
  await refresh();
  setInterval(refresh, 2000);
}

// --- one camera --------------------------------------------------------------------------
function sparkline(points, width = 360, height = 60) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height); svg.setAttribute("class", "spark");
  if (points.length < 2) return svg;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => ((x - x0) / (x1 - x0 || 1)) * (width - 4) + 2;
  const sy = (y) => height - 2 - ((y - y0) / (y1 - y0 || 1)) * (height - 4);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "));
  svg.append(line);
  return svg;
}

async function cameraPage() {
  const id = decodeURIComponent(location.pathname.split("/")[2]);
  document.getElementById("title").textContent = `Camera ${id}`;
  document.getElementById("live").src = `/api/cameras/${encodeURIComponent(id)}/live.mjpg`;
  const refresh = async () => {
    const cam = await api(`/api/cameras/${encodeURIComponent(id)}`);
    document.getElementById("title").textContent = `Camera ${id} · ${cam.up ? "up" : "down"} · ${cam.fps} fps`;
    document.getElementById("results").replaceChildren(...Object.entries(cam.latest).map(([t, s]) =>
      el("div", {}, el("b", { text: `${t} ` }), el("span", { text: summaryText(t, s) }), el("span", { class: "small", text: ` · ${s.model}` }))));
    const zones = Object.keys(cam.zones || {});
    document.getElementById("zones").textContent = zones.length ? zones.join(", ") : "none configured";
    document.getElementById("history").replaceChildren(...Object.entries(cam.history).map(([t, pts]) =>
      el("div", { class: "hist" }, el("div", { text: `${t}: ${pts.length ? fmtValue(pts[pts.length - 1][1]) : "–"}` }), sparkline(pts))));
  };
  await refresh();
  setInterval(refresh, 3000);
}

// --- alert log ---------------------------------------------------------------------------
async function alertsPage() {
  const form = document.getElementById("filters");
  const params = new URLSearchParams(location.search);
  const cams = await api("/api/cameras");
  for (const c of cams) form.camera.append(el("option", { text: c.id, value: c.id }));
  const refresh = async () => {
    const q = new URLSearchParams();
    for (const name of ["camera", "rule", "severity", "state"]) if (form[name].value) q.set(name, form[name].value);
    const alerts = await api("/api/alerts?" + q);
    for (const a of alerts) {
      if (![...form.rule.options].some((o) => o.value === a.rule)) form.rule.append(el("option", { text: a.rule, value: a.rule }));
    }
    document.querySelector("#alerts tbody").replaceChildren(...alerts.map((a) =>
      el("tr", { class: `${a.state} ${a.severity}`, "data-alert": a.id },
        el("td", {}, el("a", { href: `/alerts/${a.id}`, text: fmtTime(a.ts) })), el("td", { text: a.state }),
        el("td", { text: a.severity }), el("td", { text: a.rule }), el("td", { text: a.camera }),
        el("td", { text: fmtValue(a.value) + (a.threshold != null ? ` (limit ${fmtValue(a.threshold)})` : "") }),
        el("td", { text: a.ack ? `yes (${a.ack.by})` : "no" }), el("td", { text: verdictText(a.ack) }))));
  };
  for (const name of ["camera", "rule", "severity", "state"]) {
    if (params.get(name)) { if (![...form[name].options].some((o) => o.value === params.get(name))) form[name].append(el("option", { text: params.get(name), value: params.get(name) })); form[name].value = params.get(name); }
    form[name].addEventListener("change", refresh);
  }
  await refresh();
  setInterval(refresh, 3000);
}

// --- one alert ---------------------------------------------------------------------------
async function alertPage() {
  const id = location.pathname.split("/")[2];
  const me = await api("/api/me");
  const show = async () => {
    const a = await api(`/api/alerts/${id}`);
    document.getElementById("title").textContent = `${a.rule} on ${a.camera} (${a.state})`;
    const facts = { id: a.id, time: fmtTime(a.ts), state: a.state, severity: a.severity, task: a.task, rule: a.rule,
      camera: a.camera, value: fmtValue(a.value), threshold: a.threshold == null ? "–" : fmtValue(a.threshold),
      message: a.message, frame: a.frame_id, model: (a.labels || {}).model || "–",
      resolved: a.resolved_ts ? fmtTime(a.resolved_ts) : "–" };
    document.getElementById("facts").replaceChildren(...Object.entries(facts).flatMap(([k, v]) =>
      [el("dt", { text: k }), el("dd", { text: String(v) })]));
    const snap = document.getElementById("snapshot");
    if (a.evidence.includes("snapshot.jpg") && !snap.getAttribute("src")) snap.src = `/api/alerts/${id}/snapshot.jpg`;
    const clip = document.getElementById("clip");
    if (a.evidence.includes("clip.mp4")) {
      clip.href = `/api/alerts/${id}/clip.mp4`; clip.hidden = false; document.getElementById("play").hidden = false;
    }
    document.getElementById("evidence").textContent = a.evidence_json ? JSON.stringify(a.evidence_json, null, 2) : "(not written yet)";
    const btn = document.getElementById("ack");
    document.getElementById("ack-state").textContent = a.ack ? `acknowledged by ${a.ack.by} at ${new Date(a.ack.at * 1000).toLocaleString()}` +
      (a.ack.verdict ? ` · verdict: ${verdictText(a.ack)}` : "") : "not acknowledged";
    btn.hidden = !(me.role === "operator" && !a.ack);
    for (const b of document.querySelectorAll("button[data-verdict]")) b.hidden = !(me.role === "operator" && !(a.ack && a.ack.verdict));
  };
  let plays = 0;  // the clip plays in the snapshot's place (MJPEG, once); a new query plays it again
  document.getElementById("play").addEventListener("click", () => {
    document.getElementById("snapshot").src = `/api/alerts/${id}/clip.mjpg?play=${++plays}`;
  });
  document.getElementById("ack").addEventListener("click", async () => {
    await api(`/api/alerts/${id}/ack`, { method: "POST", headers: { "X-Requested-With": "plantsight", "Content-Type": "application/json" }, body: "{}" });
    await show();
  });
  // acknowledging with a verdict, or adding one to an acknowledgement without: the same request, with the verdict
  for (const b of document.querySelectorAll("button[data-verdict]")) {
    b.addEventListener("click", async () => {
      await api(`/api/alerts/${id}/ack`, { method: "POST", headers: { "X-Requested-With": "plantsight", "Content-Type": "application/json" }, body: JSON.stringify({ verdict: b.dataset.verdict }) });
      await show();
    });
  }
  await show();
  setInterval(show, 5000);
}

// --- health ------------------------------------------------------------------------------
async function healthPage() {
  const refresh = async () => {
    const [streams, services, shadows] = await Promise.all([api("/api/streams"), api("/api/services"),
      api("/api/shadow")]);
    document.querySelector("#streams tbody").replaceChildren(...streams.map((s) =>
      el("tr", {}, el("td", { text: s.stream }), el("td", { text: s.group || "–" }), el("td", { text: s.length }),
        el("td", { text: s.lag ?? "–" }), el("td", { text: s.pending ?? "–" }),
        el("td", { text: s.reasons ? Object.entries(s.reasons).map(([k, v]) => `${k}: ${v}`).join(", ") || "0" : "" }))));
    document.querySelector("#services tbody").replaceChildren(...services.map((s) =>
      el("tr", { class: s.up && s.ready ? "ok" : "bad" }, el("td", { text: s.service }), el("td", { text: s.replica }),
        el("td", { text: s.host }), el("td", { text: s.up && s.ready ? "ready" : (s.up ? "not ready" : "silent") }),
        el("td", { text: `${s.age_s} s ago` }))));
    document.getElementById("shadow-none").hidden = shadows.length > 0;
    document.getElementById("shadow").hidden = shadows.length === 0;
    document.querySelector("#shadow tbody").replaceChildren(...shadows.map((s) =>
      el("tr", { class: s.state === "running" ? "ok" : "bad" }, el("td", { text: s.task }),
        el("td", { text: s.live || "–" }), el("td", { text: s.shadow || s.path || "–" }),
        el("td", { text: s.share == null ? "–" : `${(100 * s.share).toFixed(0)}%` }),
        el("td", { text: s.state === "running" ? "running" : `${s.state}: ${s.error || ""}` }),
        el("td", { text: s.frames }),
        el("td", { text: s.mean == null ? "–" : `${fmtValue(s.mean)} (${s.measure})` }))));
  };
  await refresh();
  setInterval(refresh, 3000);
}

function loginPage() {
  const next = new URLSearchParams(location.search).get("next");
  if (next) document.getElementById("next").value = next;
}

document.addEventListener("DOMContentLoaded", async () => {
  const page = document.body.dataset.page;
  if (page === "login") return loginPage();
  try {
    const me = await api("/api/me");
    document.getElementById("role").textContent = `(${me.role})`;
  } catch (e) { return; }
  ({ grid: gridPage, camera: cameraPage, alerts: alertsPage, alert: alertPage, health: healthPage })[page]?.();
});
