// cnnlab serve's page: draw (pointer events: mouse, pen, touch) or upload an image; the server
// preprocesses it for the run's dataset and answers each arm's top 3 classes with the 28x28 image
// the models saw (POST /api/predict). While drawing, a prediction is asked at most every THROTTLE_MS
// and once more when the stroke ends; one request is in flight at a time, and the latest drawing is
// always the last one predicted.
"use strict";

const THROTTLE_MS = 150;
const BRUSH = 18; // px on the 280 px canvas: MNIST's stroke width once the digit fills the 20x20 box

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const armsBox = document.getElementById("arms");
const statusLine = document.getElementById("status");
const errorLine = document.getElementById("error");
const cards = new Map(); // arm name -> {root, seen, rows}

let drawing = false, last = null, hasInk = false;
let inFlight = false, dirty = false, timer = null, lastSent = -Infinity;

function setState() {
  document.body.dataset.state = inFlight || dirty || timer ? "busy" : "idle";
}

function clearPad() {
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
}

function point(event) {
  const r = pad.getBoundingClientRect(); // the border box: the drawing starts inside the border
  return {
    x: (event.clientX - r.left - pad.clientLeft) * (pad.width / pad.clientWidth),
    y: (event.clientY - r.top - pad.clientTop) * (pad.height / pad.clientHeight),
  };
}

function stroke(from, to) {
  ctx.beginPath();
  if (from.x === to.x && from.y === to.y) {
    // A dot (a press, or a move of no length) is a filled disc: browsers need not draw the round
    // caps of a zero-length line, and Chromium 156.0.8078.108 draws nothing for one.
    ctx.fillStyle = "#000";
    ctx.arc(from.x, from.y, BRUSH / 2, 0, 2 * Math.PI);
    ctx.fill();
  } else {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = BRUSH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }
  hasInk = true;
}

pad.addEventListener("pointerdown", (event) => {
  if (event.button !== 0) return;
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  last = point(event);
  stroke(last, last);
  schedule(false);
});

pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    stroke(last, p);
    last = p;
  }
  schedule(false);
});

function endStroke() {
  if (!drawing) return;
  drawing = false;
  schedule(true);
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  dirty = false;
  if (timer) { clearTimeout(timer); timer = null; }
  showError(null);
  resetCards();
  statusLine.textContent = "Draw a digit, or upload an image.";
  setState();
});

document.getElementById("upload").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  event.target.value = "";
  if (!file) return;
  clearPad();
  dirty = false;
  const form = new FormData();
  form.append("file", file, "upload");
  statusLine.textContent = "Predicting " + file.name + "…";
  await request(form, "Upload: " + file.name);
});

// Ask for a prediction of the drawing: now (the stroke ended) or within THROTTLE_MS.
function schedule(now) {
  if (!hasInk) return;
  dirty = true;
  if (!inFlight) {
    const wait = now ? 0 : lastSent + THROTTLE_MS - performance.now();
    if (wait <= 0) {
      if (timer) { clearTimeout(timer); timer = null; }
      sendDrawing();
    } else if (!timer) {
      timer = setTimeout(() => { timer = null; sendDrawing(); }, wait);
    }
  }
  setState();
}

function sendDrawing() {
  if (inFlight || !dirty || !hasInk) return;
  dirty = false;
  inFlight = true;
  lastSent = performance.now();
  setState();
  pad.toBlob((blob) => {
    const form = new FormData();
    form.append("file", blob, "drawing.png");
    request(form, "Your drawing");
  }, "image/png");
}

async function request(form, what) {
  inFlight = true;
  setState();
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    let body = null;
    try { body = await response.json(); } catch (_) { body = null; }
    if (!response.ok || !body || body.error) {
      const message = body && body.error ? body.error : "the server answered HTTP " + response.status;
      showError(message);
      statusLine.textContent = what + ": not predicted.";
    } else {
      showError(null);
      show(body);
      statusLine.textContent = what + ": predicted.";
    }
  } catch (err) {
    showError("The server did not answer (" + err.message + "); is cnnlab serve still running?");
  } finally {
    inFlight = false;
    if (dirty) schedule(false);
    setState();
  }
}

function showError(message) {
  errorLine.hidden = !message;
  errorLine.textContent = message || "";
}

// ---------------------------------------------------------------------------------------------
// The arms' cards

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function buildCards(info) {
  for (const arm of info.arms) {
    const root = element("article", "arm" + (arm.chosen ? " chosen" : ""));
    root.dataset.arm = arm.arm;
    root.append(element("h2", "", arm.arm));
    const meta = element("div", "meta", "seed " + arm.seed);
    if (arm.chosen) meta.append(element("span", "badge", arm.basis));
    root.append(meta);
    const body = element("div", "body");
    const figure = element("figure");
    const seen = element("canvas", "seen");
    seen.width = 28;
    seen.height = 28;
    seen.setAttribute("aria-label", "The 28x28 image " + arm.arm + " saw");
    figure.append(seen, element("figcaption", "", "what it saw"));
    const list = element("ol", "top");
    body.append(figure, list);
    root.append(body);
    armsBox.append(root);
    cards.set(arm.arm, { root, seen, list });
  }
  resetCards();
}

function resetCards() {
  for (const card of cards.values()) {
    card.seen.getContext("2d").clearRect(0, 0, 28, 28);
    card.list.replaceChildren(element("li", "empty", "Draw a digit to see its top 3 classes."));
    delete card.root.dataset.top;
  }
}

function show(result) {
  const image = new ImageData(28, 28);
  result.image.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (28 * y + x);
    image.data[i] = image.data[i + 1] = image.data[i + 2] = v;
    image.data[i + 3] = 255;
  }));
  for (const arm of result.arms) {
    const card = cards.get(arm.arm);
    if (!card) continue;
    card.seen.getContext("2d").putImageData(image, 0, 0);
    card.root.dataset.top = arm.top[0].class;
    card.list.replaceChildren(...arm.top.map((c) => {
      const li = element("li");
      li.dataset.class = c.class;
      const bar = element("span", "bar");
      const fill = element("span");
      fill.style.width = (100 * c.probability).toFixed(1) + "%";
      bar.append(fill);
      li.append(element("span", "label", c.class), bar, element("span", "pct", (100 * c.probability).toFixed(1) + "%"));
      return li;
    }));
  }
}

async function start() {
  clearPad();
  try {
    const response = await fetch("/api/info");
    const info = await response.json();
    document.getElementById("run").textContent = info.run + " (" + info.dataset + ")";
    document.title = "cnnlab serve: " + info.run;
    document.getElementById("explanation").textContent = info.explanation;
    document.getElementById("report-link").hidden = !info.report;
    buildCards(info);
  } catch (err) {
    showError("Cannot read the run's description from /api/info (" + err.message + ")");
  }
  setState();
}

start();
