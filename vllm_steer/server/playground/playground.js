// The vllm-steer playground: builds chat requests with a `steering` field from the form, streams
// them from this server's /v1 API, and shows the exact body as JSON, curl and Python.
// Plain browser JavaScript, no build step, nothing from other hosts.

const FINGERPRINT_HEADER = "x-vllm-steer-fingerprint";
const KEY_STORAGE = "vllm-steer-api-key";  // sessionStorage: gone when the tab closes
const FEATURE_NAME = /^L(\d+)\/F(\d+)$/;    // how the registry names a loaded feature
const MAX_SWEEP_SCALES = 16;

const $ = (id) => document.getElementById(id);

const state = { model: null, vectors: [], modes: ["add"], entries: [], entryCount: 0, lastRequest: null };

// ---- errors ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

class FieldError extends Error {  // a value the page refuses before sending
  constructor(control, message) {
    super(message);
    this.control = control;
  }
}

// The element that shows a control's errors: the .error of its field (or itself, for a
// message area such as #request-error).
function errorSlot(control) {
  if (control.classList.contains("error")) return control;
  const field = control.closest(".field");
  return field ? field.querySelector(".error") : null;
}

function showError(control, message) {
  const slot = errorSlot(control);
  slot.textContent = message;
  if (!slot.id) slot.id = `error-${Math.random().toString(36).slice(2)}`;
  if (slot !== control) {
    control.setAttribute("aria-invalid", "true");
    if (control.dataset.help === undefined) control.dataset.help = control.getAttribute("aria-describedby") || "";
    control.setAttribute("aria-describedby", `${control.dataset.help} ${slot.id}`.trim());
  }
}

function clearErrors(root = document) {
  for (const slot of root.querySelectorAll(".error")) slot.textContent = "";
  for (const control of root.querySelectorAll("[aria-invalid]")) control.removeAttribute("aria-invalid");
}

// Where a server error's `param` points: a field of the chat form, of a steering entry, or of
// the registration form (FastAPI names body fields "body.X").
function controlForParam(param, fallback) {
  if (!param) return fallback;
  param = param.replace(/^body\./, "");
  const entry = /^steering\.vectors\[(\d+)\](?:\.(\w+))?/.exec(param);
  if (entry) {
    const row = state.entries[Number(entry[1])];
    if (!row) return $("steering-error");
    const key = { name: "source", feature: "source", vector: "source", vector_b64: "source", layers: "layers",
      mode: "mode", scale: "entry-scale", min: "min", max: "max", only_active: "only-active" }[entry[2]];
    return key ? row.controls[key] : row.root.querySelector(".entry-error");
  }
  const condition = /^steering\.condition(?:\.(\w+))?/.exec(param);
  if (condition) {
    const id = { layer: "condition-layer", threshold: "condition-threshold", compare: "condition-compare" }[condition[1]];
    return $(id || "condition-source");  // its source (name, feature, vector) or the condition as a whole
  }
  const top = param.split(/[.[]/)[0];
  const fields = {
    "steering.scale": "scale", "steering.apply_to": "apply-to", max_tokens: "max-tokens", temperature: "temperature",
    messages: "message", name: "reg-name", vector: "reg-numbers", vector_b64: "reg-numbers", layers: "reg-numbers",
    upload: "reg-file", file_vector: "reg-file-vector", replace: "reg-replace",
  };
  const id = fields[param.replace(/\[.*$/, "")] || fields[top];
  if (id) return $(id);
  return param.startsWith("steering") ? $("steering-error") : fallback;
}

function showFailure(error, fallback) {
  let control = fallback;
  let message = error.message;
  if (error instanceof FieldError) control = error.control;
  else if (error instanceof ApiError) control = error.status === 401 ? $("api-key") : controlForParam(error.param, fallback);
  else message = `unexpected: ${message}`;
  if (!errorSlot(control)) control = fallback;
  if (control === fallback && error.param && !message.startsWith(error.param)) message = `${error.param}: ${message}`;
  showError(control, message);
  if (control.focus && !control.classList.contains("error")) control.focus();
}

// ---- talking to the server -----------------------------------------------------------------

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) headers.authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (error) {
    throw new ApiError(0, `could not reach the server (${error.message})`, null);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  if (response.status === 401) {
    return new ApiError(401, "401 Unauthorized: this server needs its API key (enter it here)", null);
  }
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const error = (await response.json()).error;
    if (typeof error === "string") message = `${response.status}: ${error}`;
    else if (error) {
      message = error.message || message;
      param = error.param || null;
    }
  } catch { /* not JSON: the status line says enough */ }
  return new ApiError(response.status, message, param);
}

// Reads an OpenAI-style event stream into `pane`; the fingerprint comes as a response header.
async function streamChat(body, pane) {
  pane.start();
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body });
    pane.fingerprint = response.headers.get(FINGERPRINT_HEADER);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let tokens = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new ApiError(chunk.error.code || 500, chunk.error.message, chunk.error.param || null);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) pane.append(delta.content);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
        }
      }
    }
    pane.finish(tokens, (performance.now() - started) / 1000);
  } catch (error) {
    pane.fail(error);
    throw error;
  }
}

// ---- answers: a compare pane or a sweep cell ------------------------------------------------

function makePane(root) {
  const text = root.querySelector(".text");
  const meta = root.querySelector(".meta");
  return {
    root, content: "", fingerprint: null,
    start() {
      this.content = "";
      this.fingerprint = null;
      root.dataset.state = "streaming";
      root.setAttribute("aria-busy", "true");  // screen readers wait for the whole answer
      meta.textContent = "streaming…";
      render(text, "");
    },
    append(delta) { this.content += delta; render(text, this.content); },
    finish(tokens, seconds) {
      root.dataset.state = "done";
      root.removeAttribute("aria-busy");
      const count = tokens === null ? "" : ` · ${tokens} tokens · ${(tokens / seconds).toFixed(1)} tok/s`;
      meta.textContent = `fingerprint ${this.fingerprint || "?"}${count}`;
    },
    fail(error) {
      root.dataset.state = "error";
      root.removeAttribute("aria-busy");
      meta.textContent = `failed: ${error.message}`;
    },
    note(words) { meta.textContent += ` · ${words}`; },
    rerender() { render(text, this.content); },
  };
}

function conceptPattern() {
  const words = $("words").value.split(",").map((w) => w.trim()).filter(Boolean);
  if (!words.length) return null;
  const escaped = words.map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&").replace(/\s+/g, "\\s+"));
  return new RegExp(`\\b(?:${escaped.join("|")})\\b`, "gi");  // whole words, as the sweep counts them
}

function render(element, content) {
  const pattern = conceptPattern();
  const parts = [];
  let at = 0;
  for (const match of pattern ? content.matchAll(pattern) : []) {
    parts.push(document.createTextNode(content.slice(at, match.index)));
    const mark = document.createElement("mark");
    mark.textContent = match[0];
    parts.push(mark);
    at = match.index + match[0].length;
  }
  parts.push(document.createTextNode(content.slice(at)));
  element.replaceChildren(...parts);
}

const panes = {};

// ---- the steering panel -------------------------------------------------------------------

function sourceOptions(select, keep) {
  const groups = [["Vectors", []], ["Features", []]];
  for (const vector of state.vectors) {
    const feature = FEATURE_NAME.exec(vector.name);
    const option = new Option(vector.name, feature ? `feature:${feature[1]}:${feature[2]}` : `name:${vector.name}`);
    if (feature) option.textContent = `${vector.name} (feature ${feature[2]} at layer ${feature[1]})`;
    else if (vector.layers) option.textContent = `${vector.name} (layers ${vector.layers.join(", ")})`;
    else option.textContent = `${vector.name} (any layer)`;
    groups[feature ? 1 : 0][1].push(option);
  }
  groups[1][1].push(new Option("Another SAE feature…", "other-feature"));
  select.replaceChildren(...groups.filter(([, options]) => options.length).map(([label, options]) => {
    const group = document.createElement("optgroup");
    group.label = label;
    group.append(...options);
    return group;
  }));
  if (keep && [...select.options].some((o) => o.value === keep)) select.value = keep;
}

function addEntry() {
  const root = $("entry-template").content.firstElementChild.cloneNode(true);
  const n = ++state.entryCount;
  const controls = {};
  for (const control of root.querySelectorAll("[data-key]")) {
    control.id = `entry${n}-${control.dataset.key}`;
    controls[control.dataset.key] = control;
  }
  for (const label of root.querySelectorAll("label[data-for]")) label.htmlFor = `entry${n}-${label.dataset.for}`;
  const row = { root, controls };
  sourceOptions(controls.source);
  controls.mode.replaceChildren(...state.modes.map((mode) => new Option(mode, mode)));
  controls.source.addEventListener("change", () => updateEntry(row));
  controls.mode.addEventListener("change", () => updateEntry(row));
  controls.remove.addEventListener("click", () => {
    state.entries.splice(state.entries.indexOf(row), 1);
    root.remove();
    numberEntries();
    $("add-entry").focus();
  });
  state.entries.push(row);
  $("entries").append(root);
  numberEntries();
  updateEntry(row);
  return row;
}

function numberEntries() {
  state.entries.forEach((row, i) => { row.root.querySelector("legend").textContent = `Direction ${i + 1}`; });
}

// Show the fields the chosen source and mode take (a feature steers its own layer).
function updateEntry(row) {
  const { source, mode, layers } = row.controls;
  const isFeature = !source.value.startsWith("name:");
  const vector = state.vectors.find((v) => `name:${v.name}` === source.value);
  layers.placeholder = vector && vector.layers ? `its own: ${vector.layers.join(", ")}` : "e.g. 1 or 1, 2";
  const shown = {
    "other-feature": source.value === "other-feature", layers: !isFeature,
    scale: !["ablate", "range"].includes(mode.value), range: mode.value === "range", "only-active": mode.value === "feature_clamp",
  };
  for (const part of row.root.querySelectorAll("[data-show]")) part.hidden = !shown[part.dataset.show];
}

// The condition's fields, for the chosen source (a feature is read at its own layer). A
// condition gates generated tokens only, so turning it on sets "Apply to" to match.
function updateCondition(turnedOn = false) {
  const on = $("condition-on").checked;
  const source = $("condition-source").value;
  const vector = state.vectors.find((v) => `name:${v.name}` === source);
  $("condition-fields").hidden = !on;
  $("condition-other-feature").hidden = source !== "other-feature";
  $("condition-layer-field").hidden = !source.startsWith("name:");
  $("condition-layer").placeholder = vector && vector.layers ? `one of ${vector.layers.join(", ")}` : "e.g. 2";
  if (turnedOn && on) $("apply-to").value = "generated";
}

function integer(control, what, { optional = false } = {}) {
  const text = control.value.trim();
  if (text === "" && optional) return null;
  if (!/^\d+$/.test(text)) throw new FieldError(control, `${what}: give a whole number`);
  return Number(text);
}

function number(control, what, { optional = false } = {}) {
  const text = control.value.trim();
  if (text === "" && optional) return null;
  const value = Number(text);
  if (text === "" || !Number.isFinite(value)) throw new FieldError(control, `${what}: give a number`);
  return value;
}

// What a source picker (sourceOptions) chose: {name} or {feature: [layer, id]}.
function sourceJSON(source, featureLayer, featureId) {
  if (source.value.startsWith("name:")) return { name: source.value.slice(5) };
  if (source.value === "other-feature") return { feature: [integer(featureLayer, "layer"), integer(featureId, "feature id")] };
  return { feature: source.value.split(":").slice(1).map(Number) };
}

function entryJSON(row) {
  const c = row.controls;
  const entry = sourceJSON(c.source, c["feature-layer"], c["feature-id"]);
  if (!entry.feature && c.layers.value.trim()) {
    const layers = c.layers.value.split(/[\s,]+/).filter(Boolean);
    if (!layers.every((l) => /^\d+$/.test(l))) throw new FieldError(c.layers, "layers: whole numbers, separated by commas");
    entry.layers = layers.map(Number);
  }
  entry.mode = c.mode.value;
  if (!row.root.querySelector('[data-show="scale"]').hidden) entry.scale = number(c["entry-scale"], "scale");
  if (entry.mode === "range") {
    const min = number(c.min, "min", { optional: true });
    const max = number(c.max, "max", { optional: true });
    if (min !== null) entry.min = min;
    if (max !== null) entry.max = max;
  }
  if (entry.mode === "feature_clamp" && c["only-active"].checked) entry.only_active = true;
  return entry;
}

function conditionJSON() {
  const condition = sourceJSON($("condition-source"), $("condition-feature-layer"), $("condition-feature-id"));
  if (condition.name) condition.layer = integer($("condition-layer"), "layer");
  condition.compare = $("condition-compare").value;
  condition.threshold = number($("condition-threshold"), "threshold");
  return condition;
}

function steeringSpec(scale) {
  if (!state.entries.length) throw new FieldError($("steering-error"), "add a direction to steer with");
  const spec = { vectors: state.entries.map(entryJSON), scale, apply_to: $("apply-to").value };
  if ($("condition-on").checked) spec.condition = conditionJSON();
  return spec;
}

function chatBody(steering) {
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("message").value });
  const body = {
    model: state.model, messages,
    max_tokens: integer($("max-tokens"), "max tokens"), temperature: number($("temperature"), "temperature"),
    stream: true, stream_options: { include_usage: true },
  };
  if (steering) body.steering = steering;
  return body;
}

// ---- the request, as JSON, curl and Python ------------------------------------------------

// One line per value, with the spacing people write; `words` spells null/true/false.
const JSON_WORDS = { null: "null", true: "true", false: "false" };
const PYTHON_WORDS = { null: "None", true: "True", false: "False" };

function literal(value, words) {
  if (value === null || typeof value === "boolean") return words[String(value)];
  if (Array.isArray(value)) return `[${value.map((v) => literal(v, words)).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${literal(v, words)}`).join(", ")}}`;
  }
  return JSON.stringify(value);  // numbers and strings read the same in JSON and Python
}

function showRequest(body, note) {
  state.lastRequest = { body, note };
  const url = `${location.origin}/v1`;
  const json = `{\n${Object.entries(body).map(([k, v]) => `  ${JSON.stringify(k)}: ${literal(v, JSON_WORDS)}`).join(",\n")}\n}`;
  const key = $("api-key").value.trim() ? ` \\\n  -H "Authorization: Bearer $VLLM_API_KEY"` : "";
  $("request-json").textContent = json;
  $("request-curl").textContent =
    `curl -N ${url}/chat/completions \\\n  -H 'content-type: application/json'${key} \\\n  -d '${json.replace(/'/g, "'\\''")}'`;
  const { steering, ...rest } = body;
  const args = Object.entries(rest).map(([k, v]) => `    ${k}=${literal(v, PYTHON_WORDS)},`);
  if (steering) args.push(`    extra_body={"steering": ${literal(steering, PYTHON_WORDS)}},`);
  $("request-python").textContent = [
    "import os", "", "from openai import OpenAI", "",
    `client = OpenAI(base_url=${JSON.stringify(url)}, api_key=os.environ.get("VLLM_API_KEY", "unused"))`,
    "stream = client.chat.completions.create(", ...args, ")",
    "for chunk in stream:", "    if chunk.choices:", '        print(chunk.choices[0].delta.content or "", end="", flush=True)', "print()",
  ].join("\n");
  $("request-note").textContent = note;
}

function previewRequest() {
  if (state.lastRequest && state.lastRequest.sent) return;
  try {
    showRequest(chatBody(steeringSpec(number($("scale"), "scale"))), "Preview: what Compare will send for the steered answer.");
  } catch { /* an unfinished form: keep the last preview */ }
}

async function copy(button) {
  const text = $(button.dataset.copy).textContent;
  try {
    await navigator.clipboard.writeText(text);
  } catch {  // no clipboard API (a page served over plain http to another machine): select it
    const range = document.createRange();
    range.selectNodeContents($(button.dataset.copy));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    document.execCommand("copy");
  }
  $("copy-status").textContent = `Copied the ${button.previousElementSibling.textContent}.`;
}

// ---- actions ------------------------------------------------------------------------------

async function run(action) {
  clearErrors(document.querySelector("main"));
  $("api-key").closest(".field").querySelector(".error").textContent = "";
  for (const button of [$("compare"), $("sweep")]) button.disabled = true;
  try {
    if (!state.model) throw new FieldError($("api-key"), "not connected to the server: check the API key");
    await action();
  } catch (error) {
    showFailure(error, $("request-error"));
  } finally {
    for (const button of [$("compare"), $("sweep")]) button.disabled = false;
  }
}

async function compare() {
  const steered = chatBody(steeringSpec(number($("scale"), "scale")));
  const { steering, ...plain } = steered;
  showRequest(steered, 'Compare sent this body for the steered answer, and the same without "steering" for the unsteered one.');
  state.lastRequest.sent = true;
  await firstFailure([streamChat(plain, panes.plain), streamChat(steered, panes.steered)]);
  // Say so, rather than leave it to the eye: a condition that did not hold steers nothing.
  if (panes.steered.content === panes.plain.content) panes.steered.note("the same as the unsteered answer");
}

async function sweep() {
  const scales = $("sweep-scales").value.split(/[\s,]+/).filter(Boolean).map(Number);
  if (!scales.length || scales.length > MAX_SWEEP_SCALES || !scales.every(Number.isFinite)) {
    throw new FieldError($("sweep-scales"), `give 1 to ${MAX_SWEEP_SCALES} numbers, separated by commas`);
  }
  const bodies = scales.map((scale) => chatBody(steeringSpec(scale)));
  showRequest(bodies[0], `Sweep sent this body once per scale, all at once, with steering.scale = ${scales.join(", ")}.`);
  state.lastRequest.sent = true;
  const cells = scales.map((scale) => {
    const cell = document.createElement("article");
    cell.className = "answer";
    cell.dataset.scale = String(scale);
    const title = document.createElement("h3");
    title.textContent = `scale ${scale}`;
    const meta = document.createElement("p");
    meta.className = "meta";
    const text = document.createElement("div");
    text.className = "text";
    cell.append(title, meta, text);
    return cell;
  });
  $("sweep-grid").replaceChildren(...cells);
  panes.sweep = cells.map(makePane);
  await firstFailure(bodies.map((body, i) => streamChat(body, panes.sweep[i])));
}

// Every request runs to its end; the first failure is the one shown at its field.
async function firstFailure(promises) {
  const failed = (await Promise.allSettled(promises)).find((result) => result.status === "rejected");
  if (failed) throw failed.reason;
}

async function register(event) {
  event.preventDefault();
  const form = $("register");
  clearErrors(form);
  $("reg-status").textContent = "";
  try {
    const body = { name: $("reg-name").value.trim(), replace: $("reg-replace").checked };
    const file = $("reg-file").files[0];
    const numbers = $("reg-numbers").value.trim();
    if (!body.name) throw new FieldError($("reg-name"), "give the vector a name");
    if (Boolean(file) === Boolean(numbers)) throw new FieldError($("reg-numbers"), "paste numbers or choose a file (one of them)");
    if (file) {
      body.upload = { filename: file.name, content_b64: await base64Of(file) };
      if ($("reg-file-vector").value.trim()) body.file_vector = $("reg-file-vector").value.trim();
    } else {
      const values = numbers.split(/[\s,;[\]]+/).filter(Boolean);
      const bad = values.find((v) => !Number.isFinite(Number(v)));
      if (bad !== undefined) throw new FieldError($("reg-numbers"), `not a number: ${bad}`);
      const layer = integer($("reg-layer"), "layer", { optional: true });
      if (layer === null) body.vector = values.map(Number);
      else body.layers = { [layer]: values.map(Number) };
    }
    const info = await (await api("/v1/steering/vectors", { method: "POST", body })).json();
    await loadVectors();
    const where = info.layers ? `layers ${info.layers.join(", ")}` : "any layer";
    $("reg-status").textContent = `Registered ${info.name} (${info.dimension} values, ${where}); it is in the picker now.`;
  } catch (error) {
    showFailure(error, $("reg-error"));
  }
}

function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));  // after "data:...;base64,"
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---- start --------------------------------------------------------------------------------

async function loadVectors() {
  state.vectors = (await (await api("/v1/steering/vectors")).json()).data;
  for (const row of state.entries) {
    sourceOptions(row.controls.source, row.controls.source.value);
    updateEntry(row);
  }
  sourceOptions($("condition-source"), $("condition-source").value);
  updateCondition();
}

async function connect() {
  const keyError = $("api-key").closest(".field").querySelector(".error");
  keyError.textContent = "";
  $("api-key").removeAttribute("aria-invalid");
  try {
    state.model = (await (await api("/v1/models")).json()).data[0].id;
    $("model-name").textContent = state.model;
    await loadVectors();
    if (!state.entries.length) addEntry();
    previewRequest();
  } catch (error) {
    $("model-name").textContent = "not connected";
    showFailure(error, $("api-key"));
  }
}

async function loadOptions() {
  const options = await (await fetch("/playground/options.json")).json();
  state.modes = options.modes;
  $("apply-to").replaceChildren(...options.apply_to.map((choice) => new Option(choice, choice)));
  $("condition-compare").replaceChildren(...options.compare.map((choice) => new Option(choice, choice)));
}

// Every listener is attached before anything is awaited: a key given while the options load
// must connect once they are in, not submit the key form as a plain page reload.
function start() {
  const optionsLoaded = loadOptions().catch(() => {});  // connect() reports a server it cannot reach
  panes.plain = makePane($("answer-plain"));
  panes.steered = makePane($("answer-steered"));

  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  const useKey = (event) => {
    event.preventDefault();
    if (key.value.trim()) sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    else sessionStorage.removeItem(KEY_STORAGE);
    optionsLoaded.then(connect);
  };
  key.addEventListener("change", useKey);
  $("key-form").addEventListener("submit", useKey);
  const slider = $("scale-slider");
  const scale = $("scale");
  slider.addEventListener("input", () => { scale.value = slider.value; previewRequest(); });
  scale.addEventListener("input", () => { if (scale.value !== "") slider.value = scale.value; });
  $("add-entry").addEventListener("click", () => addEntry().controls.source.focus());
  $("condition-on").addEventListener("change", () => updateCondition(true));
  $("condition-source").addEventListener("change", () => updateCondition());
  $("compare").addEventListener("click", () => run(compare));
  $("sweep").addEventListener("click", () => run(sweep));
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); run(compare); }
  });
  $("words").addEventListener("input", () => [panes.plain, panes.steered, ...(panes.sweep || [])].forEach((p) => p.rerender()));
  $("register").addEventListener("submit", register);
  for (const button of document.querySelectorAll("[data-copy]")) button.addEventListener("click", () => copy(button));
  document.querySelector("main").addEventListener("input", previewRequest);
  document.querySelector("main").addEventListener("change", previewRequest);
  optionsLoaded.then(connect);
}

start();
