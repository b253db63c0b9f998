// The ddpm-serve page: submit a generation, watch every image denoise from the SSE stream.
// Plain modern JavaScript, no build step. The stream is read with fetch() rather than
// EventSource so that an API key can travel in the Authorization header.
// The "Edit an image" panel adds an input image to the same request: img2img, inpainting
// (a mask painted on a canvas) or interpolation to a second image; the job is then
// followed like any other.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "ddpm.history";
const HISTORY_MAX = 20;
const DRAW_INTERVAL_MS = 100;     // at most 10 redraws a second, however fast frames come
const TERMINAL = new Set(["done", "error", "canceled"]);
const INPUT_NAMES = ["init_image", "mask", "interpolate_to"];   // a job's input images
// Friendlier names for the samplers /v1/models lists; an unknown one shows as its value.
const SAMPLER_LABELS = { "dpm++2m": "DPM-Solver++ (2M)", ddim: "DDIM", ddpm: "DDPM (ancestral)" };
const DEFAULT_SAMPLER = "dpm++2m";
// The strength each edit mode starts at (the API's defaults), until the user moves it.
const DEFAULT_STRENGTH = { img2img: 0.75, inpaint: 1.0, interpolate: 0.5 };
const STAGE_PX = 336;             // the edit canvas is shown about this big on screen
// Media types of the snapshot frame formats (a snapshot event's `format`).
const FRAME_TYPES = { png: "image/png", webp: "image/webp", jpeg: "image/jpeg" };
// Seeds are 63-bit: past 2^53 a JavaScript number rounds them, so the page keeps every seed
// as its decimal digits (a string), from the form to the request body, from each response to
// the history. A seed is sent as digits; the API checks its bound.
const SEED_DIGITS = /^[0-9]+$/;

const state = {
  models: new Map(),   // name → model card
  job: null,           // {id, model, num_images}
  abort: null,         // AbortController of the current stream and polling
  pending: new Map(),  // image index → latest undrawn frame {b64, format, step, final}
  drawTimer: null,
  lastDraw: 0,
  objectUrls: [],
  // Read by the browser test: frames in, redraw passes, images drawn, and the shortest
  // time between two passes' starts (the throttle's own measure, not the job's speed).
  stats: { frames: 0, draws: 0, drawn: 0, minGap: Infinity, interval: DRAW_INTERVAL_MS },
  lastStart: -Infinity,
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

// -- JSON with exact seeds ------------------------------------------------------------------

// Whether JSON.parse hands a reviver the source text of each value (Chromium, Firefox 135+).
const JSON_SOURCE = (() => {
  let seen = false;
  JSON.parse("1", (_key, value, context) => { seen = context?.source === "1"; return value; });
  return seen;
})();

// JSON.parse, but every `seed` that is a number comes back as its exact decimal digits.
function parseJson(text) {
  if (JSON_SOURCE) {
    return JSON.parse(text, (key, value, context) =>
      (key === "seed" && typeof value === "number" ? context.source : value));
  }
  // Without source access: quote the digits of every "seed" member before parsing (inside a
  // JSON string its quotes are escaped, so the pattern cannot match there).
  return JSON.parse(text.replace(/("seed"\s*:\s*)(-?[0-9][0-9.eE+-]*)/g, '$1"$2"'));
}

async function readJson(res) {
  return parseJson(await res.text());
}

// JSON.stringify, with a string `seed` of digits written as the exact integer it stands for.
function jsonBody(body) {
  const { seed, ...rest } = body;
  const text = JSON.stringify(rest);
  if (seed === undefined) return text;
  const digits = String(seed);
  if (!SEED_DIGITS.test(digits)) throw new Error(`seed: not a whole number: ${digits}`);
  const exact = digits.replace(/^0+(?=.)/, "");   // JSON has no leading zeros
  return text === "{}" ? `{"seed":${exact}}` : `{"seed":${exact},${text.slice(1)}`;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// An error's message, its field named once (validation messages already start with it).
function fieldMessage(err) {
  const message = err.message || "";
  if (!err.field || message.startsWith(`${err.field}:`)) return message;
  return `${err.field}: ${message}`;
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!res.ok) {
    let message = `HTTP ${res.status}`;
    try {
      const err = (await readJson(res)).error || {};
      message = fieldMessage(err) || message;
    } catch (_) { /* not JSON */ }
    throw new ApiError(res.status, message);
  }
  return res;
}

// -- models and the form ----------------------------------------------------------------

async function loadModels() {
  try {
    const res = await api("/v1/models");
    const { models, samplers } = await readJson(res);
    setSamplers(samplers || []);
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

// The sampler choices come from the API (one definition, in the worker contract).
function setSamplers(names) {
  const select = $("sampler");
  const previous = select.value;
  select.replaceChildren(...names.map((n) => new Option(SAMPLER_LABELS[n] || n, n)));
  if (names.includes(previous)) select.value = previous;
  else if (names.includes(DEFAULT_SAMPLER)) select.value = DEFAULT_SAMPLER;
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
  updateStepsLimit();
  onClassChange();
}

function onClassChange() {
  $("guidance-row").hidden = $("class-row").hidden || $("class_label").value === "";
}

async function requestBody() {
  const num = (id) => Number($(id).value);
  const body = {
    model: $("model").value,
    steps: num("steps"),
    num_images: num("num_images"),
    snapshot_every: num("snapshot_every"),
    snapshot_kind: $("snapshot_kind").value,
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = seed;      // digits, sent as the exact integer (jsonBody)
  if (!$("class-row").hidden && $("class_label").value !== "") {
    body.class_label = num("class_label");
    body.guidance_scale = num("guidance_scale");
  }
  if ($("sampler").value) body.sampler = $("sampler").value;
  if (edit.init) Object.assign(body, await editFields());
  return body;
}

async function onSubmit(event) {
  event.preventDefault();
  const problem = editProblem();
  showEditNote(problem);
  if (problem) return;
  $("generate").disabled = true;
  try {
    const res = await api("/v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: jsonBody(await requestBody()),
    });
    const job = await readJson(res);
    remember({ id: job.id, model: job.model, num_images: job.request.num_images,
               seed: job.request.seed, created: Date.now(), status: job.status,
               kind: editKind(job.request), inputs: inputNames(job.request) });
    follow(job);
  } catch (e) {
    showRejected(e.message);
  } finally {
    $("generate").disabled = false;
  }
}

// A submit that made no job: the job shown before goes (its status, images and links would
// read as this request's outcome; it stays in the history), the error takes its place.
function showRejected(message) {
  if (state.abort) state.abort.abort();
  state.abort = null;
  state.job = null;
  state.pending.clear();
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  showJobSection();
  $("frames").replaceChildren();
  $("inputs").replaceChildren();
  $("inputs").hidden = true;
  $("downloads").hidden = true;
  $("job-id").textContent = "";
  setStatus("rejected");
  setProgress(0, 1);
  showError(message);
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
  showInputs(job.id, job.request ? inputNames(job.request) : job.inputs || []);
  setStatus(job.status || "queued");
  setProgress(0, 1);
  const signal = state.abort.signal;
  pollQueue(job.id, signal);
  readEvents(job.id, signal).catch((e) => {
    if (!signal.aborted) showError(`stream: ${e.message}`);
  });
}

// One canvas per image, in a figure that also holds the "edit" / "B" buttons: they appear
// once the image is final and load it into the edit panel (as the image, or as image B).
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
    const figure = document.createElement("figure");
    figure.append(c, pickButton("edit", "edit this image", i, "init"),
                  pickButton("B", "use as the second image of an interpolation", i, "b"));
    frames.append(figure);
  }
}

function pickButton(text, title, index, slot) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = `pick pick-${slot}`;
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", () => pickResult(index, slot));
  return b;
}

async function pollQueue(id, signal) {
  // Queue position is not an event: ask for it while the job waits.
  while (!signal.aborted && $("status").dataset.status === "queued") {
    try {
      const res = await api(`/v1/generations/${id}`, { signal });
      const job = await readJson(res);
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
        const e = await readJson(res).catch(() => ({}));
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
    return { event, id, data: parseJson(data.join("\n")) };
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
    case "snapshot":   // the frame in its format (png, webp, jpeg); "png": older servers
      queueFrame(data.index, { b64: data.image ?? data.png, format: data.format ?? "png",
                               step: data.step, final: false });
      break;
    case "image":      // final images are always PNG; not inlined: fetched from its URL
      if (data.png) {
        queueFrame(data.index, { b64: data.png, format: "png", step: data.step, final: true });
      } else {
        queueFetched(data.index, data.url, data.step);
      }
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

// A final image fetched from its URL: a 307 to object storage (DDPM_RESULTS_URL) is
// followed, and the browser drops the API key on the way to the store's origin.
async function queueFetched(index, url, step) {
  try {
    const dataUrl = await blobToDataUrl(await (await api(url)).blob());
    queueFrame(index, { b64: dataUrl.slice(dataUrl.indexOf(",") + 1), format: "png", step,
                        final: true });
  } catch (e) {
    showError(`image ${index}: ${e.message}`);
  }
}

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
  const start = performance.now();
  state.stats.draws++;
  state.stats.minGap = Math.min(state.stats.minGap, start - state.lastStart);
  state.lastStart = start;
  const batch = [...state.pending.entries()];
  state.stats.drawn += batch.length;
  state.pending.clear();
  const canvases = $("frames").querySelectorAll("canvas");
  await Promise.all(batch.map(async ([index, frame]) => {
    const canvas = canvases[index];
    if (!canvas || !frame.b64) return;
    const bytes = Uint8Array.from(atob(frame.b64), (ch) => ch.charCodeAt(0));
    const type = FRAME_TYPES[frame.format] ?? "image/png";
    const bitmap = await createImageBitmap(new Blob([bytes], { type }));
    const ctx = canvas.getContext("2d");
    // A frame can be smaller than the image (a preview of a large model): it is scaled to
    // the canvas, smoothly; one at full size or larger keeps its pixels sharp.
    ctx.imageSmoothingEnabled = bitmap.width < canvas.width;
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    canvas.dataset.step = String(frame.step ?? 0);
    if (frame.final) {
      canvas.dataset.final = "1";
      canvas.parentElement.classList.add("final");   // shows its edit buttons
    }
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

// -- edit: an input image, a painted mask, a second image ---------------------------------

const edit = {
  init: null,              // {dataUrl, width, height}: the image as picked (its own bytes)
  b: null,                 // the second image of an interpolation, the same shape
  mask: null,              // Uint8Array of init's width × height: 1 = generate, 0 = keep
  strengthTouched: false,  // once the user moves the slider, a mode change leaves it alone
  stroke: null,            // {id, x, y}: the pointer painting now, at image coordinates
  renderQueued: false,
};

function editMode() {
  return edit.init ? $("edit_mode").value : null;
}

function maskPainted() {
  return edit.mask !== null && edit.mask.includes(1);
}

function strength() {
  return Number($("strength").value);
}

function setStrength(value) {
  $("strength").value = String(value);
  $("strength-value").textContent = strength().toFixed(2);
}

function initEdit() {
  $("init_file").addEventListener("change", () => pickFile("init"));
  $("b_file").addEventListener("change", () => pickFile("b"));
  $("edit_mode").addEventListener("change", onModeChange);
  $("strength").addEventListener("input", () => {
    edit.strengthTouched = true;
    setStrength(strength());
    updateStepsLimit();
  });
  $("brush").addEventListener("input", () => {
    $("brush-value").textContent = $("brush").value;
  });
  $("mask-clear").addEventListener("click", () => changeMask(() => 0));
  $("mask-invert").addEventListener("click", () => changeMask((m) => 1 - m));
  $("edit-remove").addEventListener("click", removeImages);
  const c = $("mask_canvas");
  c.addEventListener("pointerdown", onPointerDown);
  c.addEventListener("pointermove", onPointerMove);
  c.addEventListener("pointerup", onPointerUp);
  c.addEventListener("pointercancel", onPointerUp);
  syncMode();
}

// The mode follows the mask: painting picks inpaint, clearing it goes back to img2img.
// (Choosing img2img by hand keeps the painted mask on screen, dimmed, and does not send it.)
function syncMode() {
  const select = $("edit_mode");
  const painted = maskPainted();
  select.disabled = !edit.init;
  select.querySelector("option[value=inpaint]").disabled = !painted;
  if (painted && select.value === "img2img") select.value = "inpaint";
  if (!painted && select.value === "inpaint") select.value = "img2img";
  onModeChange();
}

function onModeChange() {
  const mode = editMode();
  $("mask-tools").hidden = !edit.init || mode === "interpolate";
  $("mask_canvas").hidden = mode === "interpolate";
  $("init-box").classList.toggle("mask-off", mode === "img2img");
  $("resample-row").hidden = mode !== "inpaint";
  $("b-row").hidden = mode !== "interpolate";
  $("stage-b").hidden = mode !== "interpolate" || !edit.b;
  // An interpolation's images are its frames, A first and B last: at least two.
  $("num_images").min = mode === "interpolate" ? "2" : "1";
  if (mode === "interpolate" && Number($("num_images").value) < 2) $("num_images").value = "2";
  if (mode && !edit.strengthTouched) setStrength(DEFAULT_STRENGTH[mode]);
  $("edit-summary").textContent = mode ? `(${mode})` : "(none: plain generation)";
  updateStepsLimit();
}

// At strength s sampling starts at t0 = ceil(s·T) − 1, so at most t0 + 1 steps fit (s·T
// rounded first, as the API does, so that 0.7 · 1000 is 700).
function updateStepsLimit() {
  const m = state.models.get($("model").value);
  if (!m) return;
  let max = Math.min(1000, m.num_timesteps);
  if (edit.init) {
    const fit = Math.ceil(Number((strength() * m.num_timesteps).toFixed(6)));
    max = Math.min(max, Math.max(1, fit));
  }
  $("steps").max = String(max);
}

function pickFile(slot) {
  const file = $(slot === "init" ? "init_file" : "b_file").files[0];
  if (file) setImage(slot, file, file.name);
}

// A finished result ("edit" / "B" on its figure), fetched as the PNG the API stored.
async function pickResult(index, slot) {
  if (!state.job) return;
  try {
    const res = await api(`/v1/generations/${state.job.id}/images/${index}`);
    await setImage(slot, await res.blob(), `image ${index} of job ${state.job.id.slice(0, 8)}`);
    if (slot === "b") {
      $("edit_mode").value = "interpolate";
      onModeChange();
    }
    $("edit-box").scrollIntoView({ block: "nearest" });
  } catch (e) {
    showEditNote(`cannot load image ${index}: ${e.message}`);
  }
}

// Loads an image into a slot ("init" or "b"). Its bytes are sent as they are, not redrawn,
// so an inpainting keeps exactly the uploaded pixels outside the mask.
async function setImage(slot, blob, caption) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch (_) {
    showEditNote(`${caption}: not an image this browser can read`);
    return;
  }
  const image = { dataUrl: await blobToDataUrl(blob), width: bitmap.width,
                  height: bitmap.height };
  const canvas = $(slot === "init" ? "init_canvas" : "b_canvas");
  canvas.width = image.width;
  canvas.height = image.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  bitmap.close();
  sizeStage($(slot === "init" ? "init-box" : "b-box"), image.width, image.height);
  $(slot === "init" ? "init-caption" : "b-caption").textContent =
    `${caption} · ${image.width}×${image.height}`;
  if (slot === "init") {
    edit.init = image;
    // A new image starts with an empty mask of its own size (what the API requires).
    edit.mask = new Uint8Array(image.width * image.height);
    $("mask_canvas").width = image.width;
    $("mask_canvas").height = image.height;
    const side = Math.max(image.width, image.height);
    $("brush").max = String(Math.max(4, Math.ceil(side / 2)));
    $("brush").value = String(Math.max(1, Math.round(side / 10)));
    $("brush-value").textContent = $("brush").value;
    $("stage").hidden = false;
    renderMask();
  } else {
    edit.b = image;
  }
  $("edit-remove").disabled = false;
  $("edit-box").open = true;
  showEditNote("");
  syncMode();
}

// Small images are shown scaled up by a whole factor (pixelated), big ones scaled down.
function sizeStage(box, width, height) {
  const side = Math.max(width, height);
  const scale = side <= STAGE_PX ? Math.floor(STAGE_PX / side) : STAGE_PX / side;
  box.style.width = `${Math.round(width * scale)}px`;
  box.style.height = `${Math.round(height * scale)}px`;
}

// Back to plain generation (the mode too: an image loaded next starts as img2img).
function removeImages() {
  edit.init = edit.b = edit.mask = null;
  $("edit_mode").value = "img2img";
  $("init_file").value = "";
  $("b_file").value = "";
  $("stage").hidden = true;
  $("stage-b").hidden = true;
  $("edit-remove").disabled = true;
  showEditNote("");
  syncMode();
}

// -- painting the mask: pointer events (mouse, pen, touch) over the image ----------------

// Image pixel coordinates (fractional) of a pointer event over the mask canvas.
function maskPoint(e) {
  const c = $("mask_canvas");
  const r = c.getBoundingClientRect();
  return { x: (e.clientX - r.left) * c.width / r.width,
           y: (e.clientY - r.top) * c.height / r.height };
}

// Sets the mask under a round brush centred at (x, y), and always the pixel under it.
function stamp(x, y) {
  const { width: w, height: h } = edit.init;
  const r = Number($("brush").value) / 2;
  const value = $("erase").checked ? 0 : 1;
  for (let py = Math.max(0, Math.floor(y - r)); py <= Math.min(h - 1, Math.floor(y + r)); py++) {
    for (let px = Math.max(0, Math.floor(x - r)); px <= Math.min(w - 1, Math.floor(x + r)); px++) {
      const dx = px + 0.5 - x;
      const dy = py + 0.5 - y;
      if (dx * dx + dy * dy <= r * r) edit.mask[py * w + px] = value;
    }
  }
  const cx = Math.floor(x);
  const cy = Math.floor(y);
  if (cx >= 0 && cx < w && cy >= 0 && cy < h) edit.mask[cy * w + cx] = value;
}

// Stamps along the segment from the previous point, so a fast drag leaves no gaps.
function strokeTo(p) {
  const s = edit.stroke;
  const gap = Math.max(0.5, Number($("brush").value) / 4);
  const n = Math.max(1, Math.ceil(Math.hypot(p.x - s.x, p.y - s.y) / gap));
  for (let i = 1; i <= n; i++) stamp(s.x + (p.x - s.x) * i / n, s.y + (p.y - s.y) * i / n);
  s.x = p.x;
  s.y = p.y;
  queueMaskRender();
}

function onPointerDown(e) {
  if (!edit.init || e.button !== 0) return;
  e.preventDefault();
  $("mask_canvas").setPointerCapture(e.pointerId);   // the stroke goes on outside the canvas
  const p = maskPoint(e);
  edit.stroke = { id: e.pointerId, ...p };
  stamp(p.x, p.y);
  queueMaskRender();
}

function onPointerMove(e) {
  if (!edit.stroke || e.pointerId !== edit.stroke.id) return;
  const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [];
  for (const ev of events.length ? events : [e]) strokeTo(maskPoint(ev));
}

function onPointerUp(e) {
  if (!edit.stroke || e.pointerId !== edit.stroke.id) return;
  edit.stroke = null;
  syncMode();
}

function changeMask(f) {
  if (!edit.mask) return;
  edit.mask = edit.mask.map(f);
  renderMask();
  syncMode();
}

function queueMaskRender() {
  if (edit.renderQueued) return;
  edit.renderQueued = true;
  requestAnimationFrame(() => {
    edit.renderQueued = false;
    renderMask();
  });
}

// The overlay: painted pixels in translucent red over the image, the rest transparent.
function renderMask() {
  if (!edit.mask) return;
  const c = $("mask_canvas");
  const overlay = new ImageData(c.width, c.height);
  edit.mask.forEach((m, i) => {
    if (m) overlay.data.set([255, 32, 64, 180], i * 4);
  });
  c.getContext("2d").putImageData(overlay, 0, 0);
}

// -- the request fields of an edit ----------------------------------------------------------

// What is missing before an edit can be sent ("" when nothing is).
function editProblem() {
  if (!edit.init) return edit.b ? "an interpolation needs a first image too" : "";
  const mode = editMode();
  if (mode === "inpaint" && !maskPainted()) return "paint the region to generate first";
  if (mode === "interpolate" && !edit.b) {
    return "choose the second image (a file, or “B” on a finished image)";
  }
  return "";
}

function showEditNote(message) {
  $("edit-note").textContent = message;
  $("edit-note").hidden = !message;
  if (message) $("edit-box").open = true;
}

// Images as data: URLs; the mask as a greyscale PNG of the image's own size,
// white (255) = generate, black (0) = keep.
async function editFields() {
  const mode = editMode();
  const fields = { init_image: edit.init.dataUrl, strength: strength() };
  if (mode === "inpaint") {
    const grey = edit.mask.map((m) => (m ? 255 : 0));
    const png = await greyPng(grey, edit.init.width, edit.init.height);
    fields.mask = await blobToDataUrl(png);
    fields.jump_length = Number($("jump_length").value);
    fields.jump_n_sample = Number($("jump_n_sample").value);
  } else if (mode === "interpolate") {
    fields.interpolate_to = edit.b.dataUrl;
  }
  return fields;
}

function inputNames(request) {
  return INPUT_NAMES.filter((name) => request && request[name]);
}

function editKind(request) {
  if (request.interpolate_to) return "interpolate";
  if (request.mask) return "inpaint";
  return request.init_image ? "img2img" : undefined;
}

// A conditioned job's inputs as the worker got them (fitted to the model), above its images.
async function showInputs(id, names) {
  const box = $("inputs");
  box.replaceChildren();
  box.hidden = names.length === 0;
  for (const name of names) {
    try {
      const blob = await (await api(`/v1/generations/${id}/inputs/${name}`)).blob();
      if (state.job?.id !== id) return;   // another job is shown by now
      const url = URL.createObjectURL(blob);
      state.objectUrls.push(url);
      const img = new Image();
      img.src = url;
      img.alt = name;
      img.dataset.name = name;
      const caption = document.createElement("figcaption");
      caption.textContent = name.replace("_", " ");
      const figure = document.createElement("figure");
      figure.append(img, caption);
      box.append(figure);
    } catch (_) { /* expired: the results are what matter */ }
  }
}

function blobToDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      // A file of no known type travels as bare base64 (the API sniffs the format).
      const url = reader.result;
      resolve(url.startsWith("data:image/") ? url : url.slice(url.indexOf(",") + 1));
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// A minimal PNG encoder for 8-bit greyscale: no canvas (which only writes RGBA).
const PNG_SIGNATURE = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function pngChunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) out[4 + i] = type.charCodeAt(i);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

async function greyPng(pixels, width, height) {
  const rows = new Uint8Array((width + 1) * height);   // each row: filter type 0, pixels
  for (let y = 0; y < height; y++) {
    rows.set(pixels.subarray(y * width, (y + 1) * width), y * (width + 1) + 1);
  }
  const zlib = new Blob([rows]).stream().pipeThrough(new CompressionStream("deflate"));
  const idat = new Uint8Array(await new Response(zlib).arrayBuffer());
  const ihdr = new Uint8Array(13);   // width, height, depth 8, colour type 0 (grey), 0, 0, 0
  const view = new DataView(ihdr.buffer);
  view.setUint32(0, width);
  view.setUint32(4, height);
  ihdr[8] = 8;
  return new Blob([PNG_SIGNATURE, pngChunk("IHDR", ihdr), pngChunk("IDAT", idat),
                   pngChunk("IEND", new Uint8Array(0))], { type: "image/png" });
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
                                                    status: h.status, inputs: h.inputs }));
    const meta = document.createElement("span");
    meta.className = "muted";
    const kind = h.kind ? ` · ${h.kind}` : "";
    meta.textContent = ` ${h.status}${kind} · seed ${h.seed} · `
      + new Date(h.created).toLocaleString();
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
  initEdit();
  renderHistory();
  loadModels().then(checkReady);
}

init();
