// loraplex console: only the public HTTP API. Everything from the server (names, cards, answers, errors) is put
// into the page as text (textContent), never as HTML. The key lives in sessionStorage: this tab only.
const $ = (sel) => document.querySelector(sel);
const state = { key: sessionStorage.getItem("loraplex-key") || "", admin: false, base: "", platform: false,
                adapters: [], panel: "adapters" };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function headers(extra = {}) {
  return state.key ? { Authorization: `Bearer ${state.key}`, ...extra } : extra;
}

async function api(path, opts = {}) {
  const res = await fetch(path, { ...opts, headers: headers(opts.headers || {}) });
  const text = await res.text();
  let body = text;
  try { body = JSON.parse(text); } catch (_) { /* plain text or CSV */ }
  const error = !res.ok ? (body && body.error ? body.error.message : `HTTP ${res.status}`) : null;
  return { ok: res.ok, status: res.status, body, error, headers: res.headers };
}

function status(message) { $("#status").textContent = message || ""; }

// ---- who is calling -----------------------------------------------------------------------------------------
async function identify() {
  const models = await api("/v1/models");
  if (!models.ok) {
    status(models.status === 401 ? "Enter an API key: this server needs one." : models.error);
    $("#who").textContent = "";
    return false;
  }
  state.base = models.body.data[0].id;
  $("#model").textContent = `base: ${state.base}`;
  state.admin = (await api("/v1/lora_adapters")).ok;
  state.platform = (await api("/v1/deployments")).status !== 404;
  document.body.classList.toggle("admin", state.admin);
  $("#who").textContent = state.admin ? "admin" : (state.key ? "tenant key" : "");
  status("");
  return true;
}

// ---- adapters ---------------------------------------------------------------------------------------------------
async function tokensServed() {
  const res = await fetch("/metrics", { headers: headers() });
  const counts = {};
  if (!res.ok) return null;  // a tenant key: the metrics name every tenant's adapters, so only the admin reads them
  for (const line of (await res.text()).split("\n")) {
    const m = line.match(/^loraplex_generation_tokens_total\{adapter="((?:[^"\\]|\\.)*)"\} ([0-9.e+]+)$/);
    if (m) counts[m[1].replace(/\\(.)/g, "$1")] = Number(m[2]);
  }
  return counts;
}

// The adapters' rows, or null (the error shown) when the server refused or failed the listing.
async function adapterRows() {
  if (state.admin) {
    const r = await api("/v1/lora_adapters");
    if (!r.ok) { status(r.error); return null; }
    return r.body.data;
  }
  const [models, mine] = [await api("/v1/models"), state.platform ? await api("/v1/adapters") : null];
  if (!models.ok) { status(models.error); return null; }
  const uploaded = Object.fromEntries(((mine && mine.ok && mine.body.data) || []).map((a) => [a.id, a]));
  return models.body.data.slice(1).map((m) => ({ name: m.id, rank: uploaded[m.id]?.rank ?? null, targets: null,
    tier: uploaded[m.id]?.tier ?? null, pinned: null, in_flight: uploaded[m.id]?.in_flight ?? null,
    card: m.card || uploaded[m.id]?.card || null }));
}

async function adminCall(path, body) {
  const r = await api(path, { method: "POST", body: JSON.stringify(body),
                              headers: { "content-type": "application/json", accept: "application/json" } });
  status(r.ok ? "" : r.error);
  await refreshAdapters();
}

async function refreshAdapters() {
  const rows = await adapterRows();
  if (rows === null) return;  // the table stays as it was
  state.adapters = rows;
  const tokens = await tokensServed();
  const body = $("#adapter-table tbody");
  body.replaceChildren(...rows.map((r) => {
    const actions = el("td");
    if (state.admin) {
      actions.append(el("button", { type: "button", "data-action": "unload", on: { click: () =>
        adminCall("/v1/unload_lora_adapter", { lora_name: r.name }) } }, "Unload"), " ",
      el("button", { type: "button", "data-action": "pin", on: { click: () =>
        adminCall("/v1/pin_lora_adapter", { lora_name: r.name, pinned: !r.pinned }) } }, r.pinned ? "Unpin" : "Pin"));
    }
    return el("tr", { "data-name": r.name }, el("td", {}, r.name), el("td", {}, r.rank ?? "–"),
      el("td", {}, (r.targets || []).join(", ") || "–"), el("td", { class: "tier" }, r.tier ?? "–"),
      el("td", {}, r.pinned == null ? "–" : r.pinned ? "yes" : "no"), el("td", {}, r.in_flight ?? "–"),
      el("td", {}, tokens ? tokens[r.name] ?? 0 : "–"), el("td", { class: "card" }, r.card ? r.card.description || "" : ""), actions);
  }));
  renderTargets();
}

// ---- compare ----------------------------------------------------------------------------------------------------
function renderTargets() {
  const box = $("#targets");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const first = box.children.length === 0;
  const names = [state.base, ...state.adapters.map((a) => a.name), "auto"];
  box.replaceChildren(...names.map((n) => el("label", {}, Object.assign(el("input", { type: "checkbox", value: n }),
    { checked: first ? n !== "auto" : checked.has(n) }), " ", n)));
}

function parseMixture(text) {
  const parts = text.split(",").map((s) => s.trim()).filter(Boolean);
  return parts.map((p) => {
    const i = p.lastIndexOf(":");
    const weight = Number(p.slice(i + 1));
    if (i < 1 || !Number.isFinite(weight)) throw new Error(`mixture: write name:weight, got ${JSON.stringify(p)}`);
    return { name: p.slice(0, i), weight };
  });
}

async function streamColumn(title, body) {
  const answer = el("div", { class: "answer" });
  const meta = el("div", { class: "meta" }, "waiting…");
  const served = el("div", { class: "meta served" });
  const col = el("div", { class: "column", "data-target": title }, el("h4", {}, title), served, answer, meta);
  $("#columns").append(col);
  const start = performance.now();
  let ttft = null;
  let usage = null;
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "content-type":
      "application/json" }), body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }) });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${res.status}`);
    }
    const score = res.headers.get("x-loraplex-route-score");
    served.textContent = `served by ${res.headers.get("x-loraplex-adapter")}` + (score ? ` (route score ${score})` : "");
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta.content;
        if (delta) {
          if (ttft === null) ttft = performance.now() - start;
          answer.textContent += delta;
        }
      }
    }
    meta.textContent = `${usage ? usage.completion_tokens : "?"} tokens · first token ${ttft === null ? "–" :
      Math.round(ttft)} ms · ${Math.round(performance.now() - start)} ms`;
    col.classList.add("done");
  } catch (e) {
    col.classList.add("error", "done");
    answer.textContent = e.message;
    meta.textContent = "";
  }
}

async function compare(ev) {
  ev.preventDefault();
  const messages = [{ role: "user", content: $("#prompt").value }];
  const common = { messages, max_tokens: Number($("#max-tokens").value), temperature: Number($("#temperature").value) };
  const jobs = [...$("#targets").querySelectorAll("input:checked")].map((i) => [i.value, { ...common, model: i.value }]);
  try {
    const mix = parseMixture($("#mixture").value);
    if (mix.length) jobs.push([mix.map((m) => `${m.name}×${m.weight}`).join(" + "), { ...common, model: state.base,
                                                                                      adapters: mix }]);
  } catch (e) { status(e.message); return; }
  $("#columns").replaceChildren();
  status("");
  await Promise.all(jobs.map(([title, body]) => streamColumn(title, body)));
  refreshAdapters();
}

// ---- upload and deploy ------------------------------------------------------------------------------------------
let picked = [];

async function filesOfEntry(entry, prefix = "") {
  if (entry.isFile) return [await new Promise((ok, no) => entry.file((f) => ok({ file: f, path: prefix + f.name }), no))];
  const reader = entry.createReader();
  const entries = await new Promise((ok, no) => reader.readEntries(ok, no));
  return (await Promise.all(entries.map((e) => filesOfEntry(e, `${prefix}${entry.name}/`)))).flat();
}

function showPicked() {
  $("#picked").replaceChildren(...picked.map((p) => el("li", {}, `${p.path} (${p.file.size} bytes)`)));
  const folder = picked.find((p) => p.path.includes("/"));
  const name = $("#upload-form").elements.name;
  if (folder && !name.value) name.value = folder.path.split("/")[0];
}

async function upload(ev) {
  ev.preventDefault();
  const form = ev.target;
  const data = new FormData();
  data.append("name", form.elements.name.value);
  if (state.admin && form.elements.tenant.value) data.append("tenant", form.elements.tenant.value);
  const archive = picked.length === 1 && /\.(zip|tar|tgz|tar\.gz)$/i.test(picked[0].file.name);
  for (const p of picked) data.append(archive ? "archive" : p.file.name, p.file, p.file.name);
  const out = $("#upload-result");
  out.textContent = "uploading…";
  const r = await api("/v1/adapters", { method: "POST", body: data });
  out.classList.toggle("error", !r.ok);
  out.textContent = r.ok ? `${r.body.id} served (rank ${r.body.rank}, ${r.body.bytes} bytes, digest ` +
    `${r.body.digest.slice(0, 12)}…) in ${r.body.seconds} s` : r.error;
  if (r.ok) { picked = []; showPicked(); await refreshAdapters(); await refreshDeployments(); }
}

function snippets(dep) {
  const url = `${location.origin}/deployments/${dep.id}/v1`;
  $("#endpoint").hidden = false;
  $("#endpoint-url").textContent = `${url}/chat/completions`;
  $("#snippet-curl").textContent = `curl ${url}/chat/completions \\\n  -H "Authorization: Bearer $API_KEY" ` +
    `-H "Content-Type: application/json" \\\n  -d '{"messages": [{"role": "user", "content": "你是谁"}]}'`;
  $("#snippet-openai").textContent = `from openai import OpenAI\nclient = OpenAI(base_url="${url}", api_key=API_KEY)\n` +
    `print(client.chat.completions.create(model="${dep.id}", messages=[{"role": "user", "content": "你是谁"}])` +
    `.choices[0].message.content)`;
}

async function refreshDeployments() {
  const select = $("#deploy-form").elements.adapter;
  select.replaceChildren(...[...state.adapters.map((a) => a.name), "auto", state.base].map((n) => el("option", { value: n }, n)));
  const r = await api("/v1/deployments");
  if (!r.ok) return;
  $("#deployment-table tbody").replaceChildren(...r.body.data.map((d) => {
    const serves = d.adapter || d.adapters.map((m) => `${m.name}×${m.weight}`).join(" + ");
    const act = async (method, path) => { const x = await api(path, { method }); status(x.ok ? "" : x.error);
      refreshDeployments(); };
    return el("tr", { "data-id": d.id }, el("td", {}, d.id), el("td", {}, d.name), el("td", {}, serves),
      el("td", {}, d.status), el("td", {},
        el("button", { type: "button", on: { click: () => snippets(d) } }, "Endpoint"), " ",
        el("button", { type: "button", on: { click: () => act("POST", `/v1/deployments/${d.id}/` +
          (d.status === "active" ? "pause" : "resume")) } }, d.status === "active" ? "Pause" : "Resume"), " ",
        el("button", { type: "button", on: { click: () => act("DELETE", `/v1/deployments/${d.id}`) } }, "Delete")));
  }));
}

async function deploy(ev) {
  ev.preventDefault();
  const f = ev.target.elements;
  const r = await api("/v1/deployments", { method: "POST", headers: { "content-type": "application/json" },
                                            body: JSON.stringify({ name: f.name.value, adapter: f.adapter.value }) });
  status(r.ok ? "" : r.error);
  if (r.ok) { snippets(r.body); refreshDeployments(); }
}

// ---- usage ------------------------------------------------------------------------------------------------------
async function usageRows(group) {
  if (state.platform) {
    const r = await api(`/v1/usage?group_by=${encodeURIComponent(group)}`);
    if (r.ok) {
      $("#usage-source").textContent = "from the ledger";
      return r.body.data.map((d) => ({ group: d[group] ?? "(none)", ...d }));
    }
  }
  $("#usage-source").textContent = "from /metrics (no ledger: start with --platform)";
  const text = await (await fetch("/metrics", { headers: headers() })).text();
  const rows = {};
  for (const line of text.split("\n")) {
    const m = line.match(/^loraplex_(prompt|generation)_tokens_total\{adapter="((?:[^"\\]|\\.)*)"\} ([0-9.e+]+)$/);
    if (!m) continue;
    const r = rows[m[2]] ||= { group: m[2], requests: null, prompt_tokens: 0, cached_tokens: null, completion_tokens: 0 };
    r[m[1] === "prompt" ? "prompt_tokens" : "completion_tokens"] = Number(m[3]);
  }
  return Object.values(rows).map((r) => ({ ...r, total_tokens: r.prompt_tokens + r.completion_tokens }));
}

async function refreshUsage() {
  const rows = await usageRows($("#group-by").value);
  const top = Math.max(1, ...rows.map((r) => r.total_tokens));
  $("#chart").replaceChildren(...rows.flatMap((r) => [el("span", {}, r.group),
    el("div", { class: "bar", style: `width: ${(100 * r.total_tokens) / top}%` }), el("span", {}, r.total_tokens)]));
  $("#usage-table tbody").replaceChildren(...rows.map((r) => el("tr", {}, ...[r.group, r.requests ?? "–",
    r.prompt_tokens, r.cached_tokens ?? "–", r.completion_tokens, r.total_tokens].map((v) => el("td", {}, v)))));
}

// ---- wiring -----------------------------------------------------------------------------------------------------
function show(panel) {
  state.panel = panel;
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.panel === panel);
  for (const s of document.querySelectorAll("main section")) s.hidden = s.id !== panel;
  $("#platform-off").hidden = state.platform;
  $("#platform-on").hidden = !state.platform;
  if (panel === "usage") refreshUsage();
  if (panel === "upload" && state.platform) refreshDeployments();
}

async function start() {
  if (await identify()) { await refreshAdapters(); show(state.panel); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("#key").value = state.key;
  $("#key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("#key").value.trim();
    sessionStorage.setItem("loraplex-key", state.key);
    start();
  });
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.panel));
  $("#compare-form").addEventListener("submit", compare);
  $("#load-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = ev.target.elements;
    await adminCall("/v1/load_lora_adapter", { lora_name: f.lora_name.value, pinned: f.pinned.checked,
                                               ...(f.lora_path.value ? { lora_path: f.lora_path.value } : {}) });
  });
  $("#upload-form").addEventListener("submit", upload);
  $("#deploy-form").addEventListener("submit", deploy);
  $("#group-by").addEventListener("change", refreshUsage);
  const drop = $("#drop");
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const entries = [...ev.dataTransfer.items].map((i) => i.webkitGetAsEntry()).filter(Boolean);
    picked = (await Promise.all(entries.map((e) => filesOfEntry(e)))).flat();
    showPicked();
  });
  for (const id of ["#files", "#folder"]) {
    $(id).addEventListener("change", (ev) => {
      picked = [...ev.target.files].map((f) => ({ file: f, path: f.webkitRelativePath || f.name }));
      showPicked();
    });
  }
  for (const b of document.querySelectorAll("[data-copy]")) {
    b.addEventListener("click", () => navigator.clipboard.writeText($(`#${b.dataset.copy}`).textContent));
  }
  setInterval(() => { if (state.panel === "adapters" && document.visibilityState === "visible") refreshAdapters(); },
              2000);
  start();
});
