// The t2i page: one form -> POST /v1/images/generations with `stream: true`, read as server-sent events
// (fetch + a stream reader, so an API key can travel in the Authorization header).
"use strict";

const $ = (id) => document.getElementById(id);
const models = {};

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

function showError(message) {
  $("error").textContent = message;
}

async function init() {
  const health = await (await fetch("/healthz")).json();
  if (health.auth) {
    $("key-row").hidden = false;
    $("api_key").value = localStorage.getItem("t2i_api_key") || "";
  }
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("t2i_api_key", $("api_key").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", applyModel);
  $("form").addEventListener("submit", generate);
  await loadModels();
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: apiHeaders() });
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  showError("");
  const list = (await response.json()).data;
  for (const m of list) models[m.id] = m.t2i;
  $("model").replaceChildren(...list.map((m) => new Option(`${m.id} (${m.t2i.kind})`, m.id)));
  $("server").textContent = `${list.length} model${list.length === 1 ? "" : "s"}`;
  applyModel();
}

function applyModel() {
  const m = models[$("model").value];
  if (!m) return;
  const [w, h] = m.default_size.split("x").map(Number);
  for (const [id, value] of [["width", w], ["height", h]]) {
    $(id).value = value;
    $(id).step = m.size_multiple;
    $(id).min = m.size_multiple;
  }
  $("steps").value = m.default_steps ?? "";
  $("guidance").value = m.default_guidance ?? "";
  const fallback = new Option(m.default_sampler ? `default (${m.default_sampler})` : "default", "");
  $("sampler").replaceChildren(fallback, ...m.samplers.map((s) => new Option(s, s)));
}

function requestBody() {
  const body = {
    model: $("model").value,
    prompt: $("prompt").value,
    size: `${$("width").value}x${$("height").value}`,
    n: 1,
    response_format: "b64_json",
    stream: true,
  };
  if ($("negative_prompt").value) body.negative_prompt = $("negative_prompt").value;
  if ($("steps").value) body.steps = Number($("steps").value);
  if ($("guidance").value) body.guidance_scale = Number($("guidance").value);
  if ($("seed").value) body.seed = Number($("seed").value);
  if ($("sampler").value) body.sampler = $("sampler").value;
  return body;
}

function setProgress(text, fraction) {
  $("progress").hidden = fraction === null;
  if (fraction !== null) $("progress").value = fraction;
  $("progress-text").textContent = text;
}

async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(type, JSON.parse(data));
    }
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = requestBody();
  const started = performance.now();
  let stepsSeen = 0;
  $("generate").disabled = true;
  setProgress("sending", 0);
  try {
    const response = await fetch("/v1/images/generations", {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response, (type, data) => {
      if (type === "queued") setProgress(data.position ? `queued behind ${data.position}` : "queued", 0);
      else if (type === "started") setProgress(`step 0/${data.steps}`, 0);
      else if (type === "progress") {
        stepsSeen = Math.max(stepsSeen, data.step);
        setProgress(`step ${data.step}/${data.steps}`, data.step / data.steps);
      } else if (type === "image_generation.completed") {
        addCard(body, data, (performance.now() - started) / 1000, stepsSeen);
      } else if (type === "error") throw new Error(data.error.message);
    });
    setProgress("", null);
  } catch (err) {
    setProgress("", null);
    showError(err.message);
  } finally {
    $("generate").disabled = false;
  }
}

function addCard(body, image, seconds, stepsSeen) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  const src = "data:image/png;base64," + image.b64_json;
  const m = models[body.model] || {};
  card.querySelector("img").src = src;
  card.querySelector("img").alt = body.prompt;
  card.querySelector(".prompt").textContent = body.prompt;
  const settings = [
    image.size,
    `${body.steps ?? m.default_steps ?? "default"} steps`,
    `guidance ${body.guidance_scale ?? m.default_guidance ?? "default"}`,
    `seed ${image.seed}`,
    body.sampler || m.default_sampler || "default sampler",
    body.model,
    `${seconds.toFixed(1)} s`,
  ];
  if (body.negative_prompt) settings.splice(1, 0, `not: ${body.negative_prompt}`);
  card.querySelector(".settings").textContent = settings.join(" · ");
  const link = card.querySelector(".download");
  link.href = src;
  link.download = `t2i-${body.model}-${image.seed}.png`;
  Object.assign(card.dataset, { seed: image.seed, size: image.size, stepsSeen });
  $("gallery").prepend(card);
}

init().catch((err) => showError(err.message));
