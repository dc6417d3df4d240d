// The playground: pick a state, chat or complete, and watch the answer stream from the server's own API.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];  // the chat so far: resent whole each turn (the server's prefix cache makes that cheap)

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function apiError(resp) {
  try { return (await resp.json()).error.message; } catch (e) { return resp.status + " " + resp.statusText; }
}

async function loadStates() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) { setStatus("cannot list states: " + await apiError(resp)); return; }
  const select = $("state");
  const current = select.value;
  select.innerHTML = "";
  for (const m of (await resp.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    select.appendChild(option);
  }
  if (current) select.value = current;
  showMeta();
  setStatus("idle");
}

function showMeta() {
  const name = $("state").value;
  if (!name) return;
  fetch("/v1/models/" + encodeURIComponent(name), { headers: headers() }).then(async (resp) => {
    const meta = $("meta");
    meta.innerHTML = "";
    if (!resp.ok) { meta.textContent = await apiError(resp); return; }
    const card = await resp.json();
    const dl = document.createElement("dl");
    const rows = [["prompt template", card.prompt_template || "(none)"],
                  ["token-shift states", card.token_shift ? "yes" : "no"]];
    for (const [k, v] of Object.entries(card.metadata || {})) {
      if (k !== "prompt_template") rows.push([k, typeof v === "string" ? v : JSON.stringify(v, null, 1)]);
    }
    for (const [k, v] of rows) {
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      dl.append(dt, dd);
    }
    meta.appendChild(dl);
  });
}

// Read a stream of server-sent events; call onData with each JSON payload until [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim()) return;
  const chat = $("mode-chat").checked;
  const body = { model: $("state").value, stream: true, temperature: Number($("temperature").value),
                 top_p: Number($("top_p").value), max_tokens: Number($("max_tokens").value) };
  let path;
  if (chat) {
    history.push({ role: "user", content: text });
    body.messages = history;
    path = "/v1/chat/completions";
    addMessage("user", text);
  } else {
    body.prompt = text;
    path = "/v1/completions";
    addMessage("user", text);
  }
  $("input").value = "";
  $("send").disabled = true;
  setStatus("streaming");
  const out = addMessage("assistant", "");
  out.id = "answer";
  document.querySelectorAll(".msg.assistant").forEach((m) => { if (m !== out) m.removeAttribute("id"); });
  let answer = "", failed = null;
  try {
    const resp = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await apiError(resp));
    await readEvents(resp, (chunk) => {
      if (chunk.error) { failed = chunk.error.message; return; }
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      answer += chat ? (choice.delta.content || "") : (choice.text || "");
      out.textContent = answer;
    });
  } catch (e) {
    failed = e.message;
  }
  $("send").disabled = false;
  if (failed) {
    out.classList.add("error");
    out.textContent = answer + (answer ? "\n" : "") + "error: " + failed;
    if (chat) history.pop();
    setStatus("error");
    return;
  }
  if (chat) history.push({ role: "assistant", content: answer });
  setStatus("done");
}

$("form").addEventListener("submit", send);
$("state").addEventListener("change", () => { history = []; $("log").innerHTML = ""; showMeta(); });
$("reset").addEventListener("click", () => { history = []; $("log").innerHTML = ""; setStatus("idle"); });
$("key").addEventListener("change", () => { sessionStorage.setItem("statetune-key", $("key").value); loadStates(); });
$("key").value = sessionStorage.getItem("statetune-key") || "";
loadStates();
