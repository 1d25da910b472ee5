// AstrID review page: one candidate at a time from the active-learning queue.
// Keys: r = real, b = bogus, s = skip, u = undo. Plain JS, no build step.
"use strict";

const META_FIELDS = ["mission", "filter", "mjd", "flux", "flux_err", "fwhm_px", "elongation",
  "sharpness", "magpsf", "sigmapsf", "fwhm", "elong", "nbad", "rb", "drb", "classtar",
  "sgscore1", "distpsnr1", "ssdistnr", "isdiffpos"];
const $ = (id) => document.getElementById(id);
const state = { reviewer: null, token: null, current: null, busy: false, done: 0 };

function setState(name) { document.body.dataset.state = name; }
function say(text) { $("message").textContent = text || ""; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (state.token) headers["Authorization"] = "Bearer " + state.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers,
    body: body === undefined ? undefined : JSON.stringify(body) });
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    const err = new Error(`${resp.status}: ${detail}`);
    err.status = resp.status;
    throw err;
  }
  return resp.json();
}

// Stamps are fetched with the token (reads may be closed) and shown as blob URLs.
async function loadStamp(img, url) {
  const headers = state.token ? { "Authorization": "Bearer " + state.token } : {};
  const resp = await fetch(url, { headers });
  if (!resp.ok) throw new Error(`stamp ${url}: ${resp.status}`);
  const old = img.src;
  img.src = URL.createObjectURL(await resp.blob());
  await img.decode().catch(() => {});
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}

function fmt(v) {
  if (v === null || v === undefined || v === "") return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(6);
  return String(v);
}

function showNumbers(c) {
  const rows = [["candidate", c.id], ["run", c.run], ["x, y (px)", `${fmt(c.x)}, ${fmt(c.y)}`],
    ["RA, Dec (deg)", `${fmt(c.ra_deg)}, ${fmt(c.dec_deg)}`], ["S/N", fmt(c.snr)],
    ["sign", c.sign === -1 ? "negative (fainter)" : c.sign === 1 ? "positive (brighter)" : "–"]];
  for (const key of META_FIELDS) {
    if (c.meta && c.meta[key] !== undefined && c.meta[key] !== null) rows.push([key, fmt(c.meta[key])]);
  }
  if (c.label_name) rows.push(["current label", c.label_name]);
  const table = $("numbers");
  table.replaceChildren(...rows.map(([k, v]) => {
    const tr = document.createElement("tr");
    for (const text of [k, v]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

async function show(c) {
  state.current = c;
  await Promise.all(["sci", "ref", "diff"].map((ch) => loadStamp($("stamp-" + ch), c.stamps[ch])));
  showNumbers(c);
  $("score").textContent = c.score === null ? "–" : c.score.toFixed(3);
  $("score-bar").style.width = c.score === null ? "0" : `${(100 * c.score).toFixed(1)}%`;
  $("model").textContent = c.model ? `model ${c.model}` : "";
  document.body.dataset.candidate = c.id;
  setState("ready");
}

async function next() {
  setState("loading");
  // /review?run=NAME reviews one run only.
  const run = new URLSearchParams(location.search).get("run");
  const out = await api("GET", "/v1/queue/next?reviewer=" + encodeURIComponent(state.reviewer)
    + (run ? "&run=" + encodeURIComponent(run) : ""));
  $("progress").textContent = `${state.done} labelled this session · ${out.remaining} unlabelled`;
  if (!out.candidate) {
    state.current = null;
    document.body.dataset.candidate = "";
    say("Nothing left to review. Thank you!");
    setState("empty");
    return;
  }
  await show(out.candidate);
}

const ACTIONS = {
  r: () => label("real"),
  b: () => label("bogus"),
  s: async () => {
    await api("POST", `/v1/candidates/${encodeURIComponent(state.current.id)}/skip`,
      { reviewer: state.reviewer });
    say(`skipped ${state.current.id}`);
    await next();
  },
  u: async () => {
    let out;
    try {
      out = await api("POST", "/v1/labels/undo", { reviewer: state.reviewer });
    } catch (err) {
      if (err.status === 404) { say("nothing to undo"); setState(state.current ? "ready" : "empty"); return; }
      throw err;
    }
    state.done = Math.max(0, state.done - 1);
    say(`undid the label of ${out.candidate.id}`);
    await show(out.candidate);
  },
};

async function label(value) {
  const c = state.current;
  await api("POST", `/v1/candidates/${encodeURIComponent(c.id)}/label`, {
    label: value, reviewer: state.reviewer, model: c.model, score_shown: c.score });
  state.done += 1;
  say(`${c.id}: ${value}`);
  await next();
}

async function act(key) {
  // One action at a time: a double key press must not label the next candidate unseen.
  if (state.busy || !ACTIONS[key] || !state.reviewer) return;
  if (key !== "u" && !state.current) return;
  state.busy = true;
  document.querySelectorAll(".buttons button").forEach((b) => { b.disabled = true; });
  try {
    await ACTIONS[key]();
  } catch (err) {
    say(err.message);
    setState("error");
  } finally {
    state.busy = false;
    document.querySelectorAll(".buttons button").forEach((b) => { b.disabled = false; });
  }
}

function start() {
  $("login").hidden = true;
  $("review").hidden = false;
  $("who").textContent = `reviewer: ${state.reviewer}`;
  nextOrError();
}

async function nextOrError() {
  try { await next(); } catch (err) { say(err.message); setState("error"); }
}

document.addEventListener("keydown", (ev) => {
  if (ev.target.tagName === "INPUT" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const key = ev.key.toLowerCase();
  if (ACTIONS[key]) { ev.preventDefault(); act(key); }
});
document.querySelectorAll(".buttons button").forEach((b) => {
  b.addEventListener("click", () => act(b.dataset.key));
});
$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.reviewer = $("reviewer").value.trim();
  state.token = $("token").value;
  sessionStorage.setItem("astrid.reviewer", state.reviewer);
  sessionStorage.setItem("astrid.token", state.token);
  start();
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem("astrid.reviewer");
  sessionStorage.removeItem("astrid.token");
  location.reload();
});

state.reviewer = sessionStorage.getItem("astrid.reviewer");
state.token = sessionStorage.getItem("astrid.token");
if (state.reviewer && state.token) start();
