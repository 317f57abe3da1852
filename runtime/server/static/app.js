// The sdlite page: a client of the server's own A1111 API (no build step, no dependencies).
"use strict";

const $ = (id) => document.getElementById(id);
let mode = "txt2img";
let maskPainted = false;

function authHeaders() {
  const token = localStorage.getItem("sdlite-token");
  return token ? { Authorization: "Bearer " + token } : {};
}

// JSON API call; asks for the token once when the server answers 401.
async function api(path, body, retried = false) {
  const options = { headers: { ...authHeaders() } };
  if (body !== undefined) {
    options.method = "POST";
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401 && !retried) {
    const token = prompt("This server needs its token:");
    if (token) {
      localStorage.setItem("sdlite-token", token);
      return api(path, body, true);
    }
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.detail || response.statusText);
  return data;
}

function fillSelect(select, items, selected) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === selected)));
}

async function loadChoices() {
  const [models, samplers, schedules, options] = await Promise.all([
    api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/options"),
  ]);
  fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
  fillSelect($("sampler"), [["", "model default"], ...samplers.map((s) => [s.name, s.name])], "");
  fillSelect($("scheduler"), schedules.map((s) => [s.name, s.label]), "automatic");
}

$("model").addEventListener("change", async (event) => {
  $("status").textContent = "loading " + event.target.value + "…";
  try {
    await api("/sdapi/v1/options", { sd_model_checkpoint: event.target.value });
    $("status").textContent = "";
  } catch (error) {
    $("status").textContent = error.message;
  }
});

for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    mode = tab.dataset.mode;
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    $("img2img-panel").hidden = mode !== "img2img";
  });
}

// --- image upload and mask brush -------------------------------------------------------------------------------
const canvas = $("mask-canvas");
const context = canvas.getContext("2d");

$("image-input").addEventListener("change", () => {
  const file = $("image-input").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { $("init-image").src = reader.result; };
  reader.readAsDataURL(file);
});

$("init-image").addEventListener("load", () => {
  canvas.width = $("init-image").naturalWidth;
  canvas.height = $("init-image").naturalHeight;
  clearMask();
});

function clearMask() {
  context.fillStyle = "black";
  context.fillRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}
$("clear-mask").addEventListener("click", clearMask);

function paint(event) {
  const box = canvas.getBoundingClientRect();
  const scale = canvas.width / box.width;
  context.fillStyle = "white";
  context.beginPath();
  context.arc((event.clientX - box.left) * scale, (event.clientY - box.top) * scale, $("brush").value * scale / 2, 0, 2 * Math.PI);
  context.fill();
  maskPainted = true;
}
canvas.addEventListener("pointerdown", (event) => { canvas.setPointerCapture(event.pointerId); paint(event); });
canvas.addEventListener("pointermove", (event) => { if (event.buttons) paint(event); });

// --- generation and progress -----------------------------------------------------------------------------------
const number = (id) => ($(id).value === "" ? null : Number($(id).value));

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    steps: number("steps"),
    cfg_scale: number("cfg"),
    seed: number("seed"),
    batch_size: number("batch"),
    width: number("width"),
    height: number("height"),
    sampler_name: $("sampler").value || null,
    scheduler: $("scheduler").value,
  };
  if (mode === "img2img") {
    if (!$("init-image").src) throw new Error("choose an image first");
    body.init_images = [$("init-image").src];
    body.denoising_strength = number("strength");
    if (maskPainted) body.mask = canvas.toDataURL("image/png");
  }
  return body;
}

async function pollProgress(running) {
  while (running.active) {
    try {
      const state = await api("/sdapi/v1/progress?skip_current_image=false");
      if (!running.active) break;
      $("progress-bar").value = state.progress;
      const job = state.state;
      $("status").textContent = job.sampling_steps ? `step ${job.sampling_step}/${job.sampling_steps}` : "waiting…";
      if (state.current_image) {
        $("preview").src = "data:image/png;base64," + state.current_image;
        $("preview").hidden = false;
      }
    } catch (error) { /* a missed poll is retried */ }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

function showResult(image, infotext) {
  const figure = document.createElement("figure");
  figure.className = "result";
  const img = new Image();
  img.src = "data:image/png;base64," + image;
  img.alt = infotext.split("\n")[0];
  const caption = document.createElement("figcaption");
  caption.className = "infotext";
  caption.textContent = infotext;
  figure.append(img, caption);
  $("gallery").prepend(figure);
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").textContent = "";
  const running = { active: true };
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress-bar").value = 0;
  try {
    const body = requestBody();
    pollProgress(running);
    const result = await api(mode === "img2img" ? "/sdapi/v1/img2img" : "/sdapi/v1/txt2img", body);
    const info = JSON.parse(result.info);
    result.images.forEach((image, i) => showResult(image, info.infotexts[i] || ""));
    $("progress-bar").value = 1;
  } catch (error) {
    $("error").textContent = error.message;
  } finally {
    running.active = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("status").textContent = "";
    $("preview").hidden = true;
  }
});

$("interrupt").addEventListener("click", () => api("/sdapi/v1/interrupt", {}).catch(() => {}));

loadChoices().catch((error) => { $("error").textContent = error.message; });
