// The proxytune playground: three streams from the server this page came from (no other host is contacted).
// base alone and expert alone use the `alone` extension field, the proxy column `alpha` and `details`
// (each generated token with every role's top tokens and the probability each gave it). The API key stays
// in this page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, alphas: [1.0], running: {}, ran: false };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

let asked = 0;  // only the latest reading of the model counts (the key may change while one is under way)

async function loadModel() {
  const mine = ++asked;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const body = await response.json();
    if (mine !== asked) return;
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    const card = body.data[0];
    state.model = card.id;
    const info = card.proxytune || {};
    state.alphas = info.alpha && info.alpha.length ? info.alpha : [1.0];
    const roles = Object.entries(info.roles || {}).map(([role, name]) => role + ": " + name).join(", ");
    $("model").textContent = "model " + card.id + (roles ? " (" + roles + ")" : "");
    buildSliders();
    showError("");
  } catch (error) {
    if (mine === asked) showError("Could not read the model: " + error.message);
  }
}

function buildSliders() {
  const box = $("alphas");
  box.replaceChildren();
  state.alphas.forEach((alpha, pair) => {
    const label = document.createElement("label");
    const name = state.alphas.length > 1 ? "α" + (pair + 1) : "α";
    const slider = document.createElement("input");
    Object.assign(slider, { type: "range", min: "-1", max: "3", step: "0.1", value: String(alpha), id: "alpha-" + pair });
    slider.setAttribute("aria-label", name);
    const shown = document.createElement("output");
    shown.textContent = Number(alpha).toFixed(1);
    slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(1); });
    slider.addEventListener("change", () => { if (state.ran) run("proxy"); });  // α moves: the proxy column only
    label.append(name + " ", slider, shown);
    box.append(label);
  });
}

function alphas() {
  return state.alphas.map((_, pair) => Number($("alpha-" + pair).value));
}

function body(column) {
  const mode = $("mode").value;
  const text = $("prompt").value;
  const request = { model: state.model, stream: true, max_tokens: Number($("max_tokens").value),
                    temperature: Number($("temperature").value), top_p: Number($("top_p").value) };
  if ($("seed").value !== "") request.seed = Number($("seed").value);
  if (mode === "chat") request.messages = [{ role: "user", content: text }];
  else request.prompt = text;
  if (column === "proxy") Object.assign(request, { alpha: alphas(), details: 5 });
  else request.alone = column;
  return [mode === "chat" ? "/v1/chat/completions" : "/v1/completions", request];
}

// One column: POST, then read the server-sent events as they come.
async function run(column) {
  if (state.running[column]) state.running[column].abort();
  const controller = new AbortController();
  state.running[column] = controller;
  const out = $("out-" + column);
  out.replaceChildren();
  if (column === "proxy") {
    $("alpha-shown").textContent = "(α = " + alphas().map((a) => a.toFixed(1)).join(", ") + ")";
    $("summary").textContent = "";
  }
  const [path, request] = body(column);
  const steps = [];
  try {
    const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(request),
                                         signal: controller.signal });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error ? error.error.message : response.status + " " + response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", pending = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        const text = choice.delta ? choice.delta.content : choice.text;
        pending = pending.concat(choice.proxytune || []);
        if (text) {
          out.append(column === "proxy" ? tokenSpan(text, pending) : text);
          steps.push(...pending);
          pending = [];
        }
      }
    }
    if (column === "proxy") summarise(steps);
  } catch (error) {
    if (error.name === "AbortError") return;
    const failed = document.createElement("p");
    failed.className = "failed";
    failed.textContent = "Error: " + error.message;
    out.append(failed);
    showError(column + ": " + error.message);
  }
}

function shift(step) { return step.chosen.proxy - step.chosen.base; }
function changed(step) { return step.top.proxy[0][0] !== step.top.base[0][0]; }

// A piece of proxy text (one or more tokens released together), coloured by the largest shift among them.
function tokenSpan(text, details) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (!details.length) return span;
  const moved = details.reduce((a, d) => (Math.abs(shift(d)) > Math.abs(a) ? shift(d) : a), 0);
  const strength = Math.min(Math.abs(moved), 1) * 0.5;
  span.style.backgroundColor = moved >= 0 ? `rgba(30, 140, 60, ${strength})` : `rgba(200, 40, 40, ${strength})`;
  if (details.some(changed)) span.classList.add("changed");
  span.dataset.shift = moved.toFixed(4);
  span.tabIndex = 0;  // keyboard: focus shows the details too
  span.title = details.map((d) => `${JSON.stringify(d.token)}: proxy ${d.chosen.proxy.toFixed(3)}, base ${d.chosen.base.toFixed(3)}`).join("\n");
  const show = () => showDetail(details);
  span.addEventListener("mouseenter", show);
  span.addEventListener("focus", show);
  return span;
}

function showDetail(details) {
  const box = $("detail");
  box.replaceChildren();
  for (const step of details) {
    const heading = document.createElement("p");
    heading.textContent = `token ${JSON.stringify(step.token)}: p proxy ${step.chosen.proxy.toFixed(3)}, ` +
      `base ${step.chosen.base.toFixed(3)}, shift ${shift(step) >= 0 ? "+" : ""}${shift(step).toFixed(3)}`;
    const table = document.createElement("table");
    const roles = Object.keys(step.top);
    const head = table.insertRow();
    roles.forEach((role) => { const th = document.createElement("th"); th.textContent = role; head.append(th); });
    const depth = Math.max(...roles.map((role) => step.top[role].length));
    for (let i = 0; i < depth; i++) {
      const row = table.insertRow();
      roles.forEach((role) => {
        const entry = step.top[role][i];
        row.insertCell().textContent = entry ? `${JSON.stringify(entry[0])} ${entry[1].toFixed(3)}` : "";
      });
    }
    box.append(heading, table);
  }
  box.hidden = false;
}

function summarise(steps) {
  if (!steps.length) return;
  const moved = steps.filter(changed).length;
  const mean = steps.reduce((a, s) => a + shift(s), 0) / steps.length;
  $("summary").textContent = `${steps.length} tokens; the top token changed at ${moved} ` +
    `(${(100 * moved / steps.length).toFixed(0)} %); mean shift of the chosen token ${mean >= 0 ? "+" : ""}${mean.toFixed(3)}`;
}

$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  showError("");
  $("detail").hidden = true;
  state.ran = true;
  ["base", "expert", "proxy"].forEach((column) => run(column));
});
$("api_key").addEventListener("change", loadModel);
loadModel();
