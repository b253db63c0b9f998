// The ddpm-serve page: submit a generation, watch every image denoise from the SSE stream.
// Plain modern JavaScript, no build step. The stream is read with fetch() rather than
// EventSource so that an API key can travel in the Authorization header.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "ddpm.history";
const HISTORY_MAX = 20;
const DRAW_INTERVAL_MS = 100;     // at most 10 redraws a second, however fast frames come
const TERMINAL = new Set(["done", "error", "canceled"]);

const state = {
  models: new Map(),   // name → model card
  job: null,           // {id, model, num_images}
  abort: null,         // AbortController of the current stream and polling
  pending: new Map(),  // image index → latest undrawn frame {png, step, final}
  drawTimer: null,
  lastDraw: 0,
  objectUrls: [],
  stats: { frames: 0, draws: 0 },  // read by the browser test: frames in, redraw passes
};
window.ddpmStats = state.stats;

// -- HTTP -----------------------------------------------------------------------------

function apiKey() {
  return $("api_key").value.trim();
}

function authHeaders(extra = {}) {
  const h = { ...extra };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      const body = await res.json();
      const err = body.error || {};
      message = err.field ? `${err.field}: ${err.message}` : err.message || message;
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, message);
  }
  return res;
}

// -- models and the form ----------------------------------------------------------------

async function loadModels() {
  try {
    const res = await api("/v1/models");
    const { models } = await res.json();
    state.models = new Map(models.map((m) => [m.name, m]));
    const select = $("model");
    const previous = select.value;
    select.replaceChildren(...models.map((m) => new Option(
      `${m.name} (${m.image_size}px${m.num_classes ? `, ${m.num_classes} classes` : ""})`, m.name)));
    if (state.models.has(previous)) select.value = previous;
    onModelChange();
    $("generate").disabled = models.length === 0;
    setHealth(models.length ? `${models.length} model(s) served` : "no model is served yet");
  } catch (e) {
    if (e.status === 401) {
      $("key-box").open = true;
      setHealth("this service needs an API key");
    } else {
      setHealth(`cannot list models: ${e.message}`);
    }
  }
}

function setHealth(text) {
  $("health").textContent = text;
}

function onModelChange() {
  const m = state.models.get($("model").value);
  if (!m) return;
  const classes = m.num_classes || 0;
  $("class-row").hidden = classes === 0;
  const names = m.class_names && m.class_names.length ? m.class_names
    : Array.from({ length: classes }, (_, i) => String(i));
  $("class_label").replaceChildren(new Option("any (unconditional)", ""),
    ...names.map((n, i) => new Option(n, String(i))));
  $("steps").max = Math.min(1000, m.num_timesteps);
  onClassChange();
}

function onClassChange() {
  $("guidance-row").hidden = $("class-row").hidden || $("class_label").value === "";
}

function requestBody() {
  const num = (id) => Number($(id).value);
  const body = {
    model: $("model").value,
    sampler: $("sampler").value,
    steps: num("steps"),
    num_images: num("num_images"),
    snapshot_every: num("snapshot_every"),
    snapshot_kind: $("snapshot_kind").value,
  };
  if ($("seed").value !== "") body.seed = num("seed");
  if (!$("class-row").hidden && $("class_label").value !== "") {
    body.class_label = num("class_label");
    body.guidance_scale = num("guidance_scale");
  }
  return body;
}

async function onSubmit(event) {
  event.preventDefault();
  $("generate").disabled = true;
  try {
    const res = await api("/v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const job = await res.json();
    remember({ id: job.id, model: job.model, num_images: job.request.num_images,
               seed: job.request.seed, created: Date.now(), status: job.status });
    follow(job);
  } catch (e) {
    showJobSection();
    showError(e.message);
  } finally {
    $("generate").disabled = false;
  }
}

// -- following a job ---------------------------------------------------------------------

function showJobSection() {
  $("job").hidden = false;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setStatus(status) {
  $("status").textContent = status;
  $("status").dataset.status = status;
  $("cancel").disabled = !(status === "queued" || status === "running");
  if (status !== "queued") $("queue").textContent = "";
  if (state.job) updateHistory(state.job.id, { status });
}

function setProgress(done, total) {
  $("progress").max = Math.max(total, 1);
  $("progress").value = done;
  $("progress").title = `${done} / ${total} steps`;
}

function follow(job) {
  if (state.abort) state.abort.abort();
  state.abort = new AbortController();
  state.pending.clear();
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  const n = job.request ? job.request.num_images : job.num_images;
  state.job = { id: job.id, model: job.model, num_images: n };
  showJobSection();
  showError("");
  $("downloads").hidden = true;
  $("job-id").textContent = job.id;
  makeCanvases(n, state.models.get(job.model));
  setStatus(job.status || "queued");
  setProgress(0, 1);
  const signal = state.abort.signal;
  pollQueue(job.id, signal);
  readEvents(job.id, signal).catch((e) => {
    if (!signal.aborted) showError(`stream: ${e.message}`);
  });
}

function makeCanvases(n, model) {
  const size = model ? model.image_size : 32;
  const frames = $("frames");
  frames.replaceChildren();
  frames.style.setProperty("--cols", String(Math.ceil(Math.sqrt(n))));
  for (let i = 0; i < n; i++) {
    const c = document.createElement("canvas");
    c.width = size;
    c.height = size;
    c.dataset.index = String(i);
    c.dataset.step = "0";
    c.title = `image ${i}`;
    frames.append(c);
  }
}

async function pollQueue(id, signal) {
  // Queue position is not an event: ask for it while the job waits.
  while (!signal.aborted && $("status").dataset.status === "queued") {
    try {
      const res = await api(`/v1/generations/${id}`, { signal });
      const job = await res.json();
      if (job.status === "queued") {
        const ahead = job.queue_position;
        $("queue").textContent = ahead == null ? "waiting" : `${ahead} job(s) ahead`;
      } else if ($("status").dataset.status === "queued") {
        setStatus(job.status);
      }
    } catch (_) { /* the stream reports failures */ }
    await sleep(1000, signal);
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

async function readEvents(id, signal) {
  let lastId = null;
  for (let attempt = 0; attempt < 30 && !signal.aborted; attempt++) {
    try {
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (lastId) headers["Last-Event-ID"] = lastId;
      // images=inline: the final PNGs arrive in the `image` events, drawn like frames
      const res = await fetch(`/v1/generations/${id}/events?images=inline`, { headers, signal });
      if (!res.ok) {
        const e = await res.json().catch(() => ({}));
        throw new ApiError(res.status, e.error?.message || `HTTP ${res.status}`);
      }
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const message = parseSse(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!message) continue;
          if (message.id) lastId = message.id;
          if (onEvent(message.event, message.data)) return;
        }
      }
    } catch (e) {
      if (signal.aborted || (e instanceof ApiError && e.status < 500)) throw e;
    }
    await sleep(1000, signal);  // dropped: reconnect and resume after the last id seen
  }
}

function parseSse(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") id = value;
  }
  if (!data.length) return null;
  try {
    return { event, id, data: JSON.parse(data.join("\n")) };
  } catch (_) {
    return null;
  }
}

// Returns true when the stream has ended.
function onEvent(event, data) {
  switch (event) {
    case "started":
      setStatus("running");
      break;
    case "progress":
      setProgress(data.steps_done, data.total_steps);
      break;
    case "snapshot":
      queueFrame(data.index, { png: data.png, step: data.step, final: false });
      break;
    case "image":
      queueFrame(data.index, { png: data.png, step: data.step, final: true });
      break;
    case "requeued":
      setStatus("queued");
      break;
    case "done":
      setProgress(1, 1);
      setStatus("succeeded");
      showDownloads();
      break;
    case "error":
      setStatus("failed");
      showError(data.message || "the job failed");
      break;
    case "canceled":
      setStatus("canceled");
      break;
    default:
      break;
  }
  return TERMINAL.has(event);
}

// -- drawing: the latest frame per image, at most every DRAW_INTERVAL_MS -------------

function queueFrame(index, frame) {
  state.stats.frames++;
  const prev = state.pending.get(index);
  if (prev && prev.final && !frame.final) return;
  state.pending.set(index, frame);
  if (state.drawTimer === null) {
    const wait = Math.max(0, DRAW_INTERVAL_MS - (performance.now() - state.lastDraw));
    state.drawTimer = setTimeout(drawPending, wait);
  }
}

async function drawPending() {
  state.stats.draws++;
  const batch = [...state.pending.entries()];
  state.pending.clear();
  const canvases = $("frames").children;
  await Promise.all(batch.map(async ([index, frame]) => {
    const canvas = canvases[index];
    if (!canvas || !frame.png) return;
    const bytes = Uint8Array.from(atob(frame.png), (ch) => ch.charCodeAt(0));
    const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    canvas.dataset.step = String(frame.step ?? 0);
    if (frame.final) canvas.dataset.final = "1";
  }));
  state.lastDraw = performance.now();
  state.drawTimer = null;
  if (state.pending.size) state.drawTimer = setTimeout(drawPending, DRAW_INTERVAL_MS);
}

async function showDownloads() {
  const root = `/v1/generations/${state.job.id}`;
  const links = [["grid-link", `${root}/grid.png`], ["gif-link", `${root}/animation.gif`]];
  for (const [id, url] of links) {
    if (apiKey()) {  // a plain link cannot carry the key: fetch it into a blob
      try {
        const blob = await (await api(url)).blob();
        const objectUrl = URL.createObjectURL(blob);
        state.objectUrls.push(objectUrl);
        $(id).href = objectUrl;
      } catch (e) {
        showError(`download: ${e.message}`);
      }
    } else {
      $(id).href = url;
    }
  }
  $("downloads").hidden = false;
}

async function onCancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    await api(`/v1/generations/${state.job.id}`, { method: "DELETE" });
  } catch (e) {
    showError(e.message);
  }
}

// -- history (this browser only) ---------------------------------------------------------

function history() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
  } catch (_) {
    return [];
  }
}

function saveHistory(items) {
  localStorage.setItem(HISTORY_KEY, JSON.stringify(items.slice(0, HISTORY_MAX)));
  renderHistory();
}

function remember(entry) {
  saveHistory([entry, ...history().filter((h) => h.id !== entry.id)]);
}

function updateHistory(id, changes) {
  const items = history();
  const item = items.find((h) => h.id === id);
  if (item && Object.entries(changes).some(([k, v]) => item[k] !== v)) {
    Object.assign(item, changes);
    saveHistory(items);
  }
}

function renderHistory() {
  $("history").replaceChildren(...history().map((h) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "link";
    button.textContent = `${h.model} × ${h.num_images}`;
    button.addEventListener("click", () => follow({ id: h.id, model: h.model,
                                                    num_images: h.num_images,
                                                    status: h.status }));
    const meta = document.createElement("span");
    meta.className = "muted";
    meta.textContent = ` ${h.status} · seed ${h.seed} · ${new Date(h.created).toLocaleString()}`;
    li.append(button, meta);
    return li;
  }));
}

// -- start -------------------------------------------------------------------------------

async function checkReady() {
  try {
    const res = await fetch("/readyz");
    if (!res.ok) setHealth("not ready: no live worker yet");
  } catch (_) {
    setHealth("the service is unreachable");
  }
}

function init() {
  $("api_key").value = sessionStorage.getItem("ddpm.key") || "";
  $("api_key").addEventListener("change", () => {
    sessionStorage.setItem("ddpm.key", apiKey());
    loadModels();
  });
  $("model").addEventListener("change", onModelChange);
  $("class_label").addEventListener("change", onClassChange);
  $("form").addEventListener("submit", onSubmit);
  $("cancel").addEventListener("click", onCancel);
  renderHistory();
  loadModels().then(checkReady);
}

init();
