// lmops playground: streams a completion over SSE (fetch + ReadableStream), colours tokens by
// probability, and sends thumbs up/down or a corrected completion to /v1/feedback. For a model with
// its own chat template the text is a user message: the playground shows the prompt the template makes
// of it (/v1/chat/render) and streams the reply from /v1/chat/completions.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // {generation_id, completion, model_version}
let controller = null;
let modelId = null; // the id /v1/chat/completions takes

function bucket(p) { return p < 0.1 ? 0 : p < 0.3 ? 1 : p < 0.5 ? 2 : p < 0.75 ? 3 : 4; }
function setStatus(text, kind) { const s = $("status"); s.textContent = text; s.className = "status " + (kind || ""); }
function headers() {
  const h = { "Content-Type": "application/json" };
  const t = $("token").value || localStorage.getItem("lmops-token");
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}
function errorText(body, fallback) {
  const field = body && body.error && (body.error.field || body.error.param);
  return body && body.error ? `${field ? field + ": " : ""}${body.error.message}` : fallback;
}

async function loadInfo() {
  try {
    const r = await fetch("/v1/info");
    const info = await r.json();
    const pill = $("model");
    if (info.ready) { pill.textContent = `${info.model_name} · version ${info.model_version}`; pill.classList.remove("bad"); }
    else { pill.textContent = "model loading…"; pill.classList.add("bad"); setTimeout(loadInfo, 1000); }
    modelId = info.model_name;
    if (info.chat_template && $("chat-toggle").hidden) { $("chat-toggle").hidden = false; $("chat").checked = true; chatMode(); }
    $("token-row").hidden = !info.auth_required;
  } catch (e) { $("model").textContent = "server unreachable"; $("model").classList.add("bad"); }
}

function setFeedbackEnabled(on) { for (const id of ["up", "down", "edit"]) $(id).disabled = !on; }

function addToken(tok) {
  const span = document.createElement("span");
  span.className = "tok" + (tok.prob !== undefined ? " p" + bucket(tok.prob) : "");
  span.textContent = tok.text;
  if (tok.prob !== undefined) span.title = `p = ${tok.prob.toFixed(3)}`;
  $("completion").appendChild(span);
}

function chatMode() {
  const chat = $("chat").checked;
  $("prompt-label").textContent = chat ? "Message" : "Prompt";
  $("prompt").placeholder = chat ? "Type a message and press Generate (Ctrl+Enter)" : "Type a prompt and press Generate (Ctrl+Enter)";
}

function sampling() {
  const body = { temperature: parseFloat($("temperature").value || "0.8"), top_p: parseFloat($("top_p").value || "1") };
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  return body;
}

async function generate() {
  const text = $("prompt").value;
  if (!text) { setStatus("type a prompt first", "err"); return; }
  current = null; setFeedbackEnabled(false); $("editor").hidden = true;
  for (const id of ["up", "down"]) $(id).classList.remove("chosen");
  $("prompt-echo").textContent = text; $("prompt-echo").className = ""; $("completion").textContent = ""; $("meta").textContent = "";
  setStatus("generating…");
  const maxTokens = parseInt($("max_new_tokens").value || "64", 10);
  controller = new AbortController();
  $("generate").disabled = true; $("stop").hidden = false;
  try {
    if ($("chat").checked) await generateChat(text, maxTokens);
    else await stream("/v1/generate", { prompt: text, stream: true, logprobs: true, max_new_tokens: maxTokens, ...sampling() }, handle);
  } catch (e) {
    if (e.name !== "AbortError") setStatus("request failed: " + e.message, "err"); else setStatus("stopped");
  } finally {
    $("generate").disabled = false; $("stop").hidden = true; controller = null;
  }
}

// a chat model: the message through its template (shown as the prompt), the reply in OpenAI's stream shape
async function generateChat(message, maxTokens) {
  const messages = [{ role: "user", content: message }];
  const r = await fetch("/v1/chat/render", { method: "POST", headers: headers(), body: JSON.stringify({ messages }), signal: controller.signal });
  const rendered = await r.json().catch(() => null);
  if (!r.ok) { setStatus(errorText(rendered, `HTTP ${r.status}`), "err"); return; }
  $("prompt-echo").textContent = rendered.prompt; $("prompt-echo").className = "chat-prompt";
  const t0 = performance.now();
  const reply = { id: null, text: "", tokens: 0, version: null, finish: null };
  const body = { model: modelId, messages, stream: true, logprobs: true, max_tokens: maxTokens, ...sampling() };
  await stream("/v1/chat/completions", body, (event, chunk) => {
    if (chunk === "[DONE]") {
      const ms = performance.now() - t0;
      handle("done", { generation_id: reply.id, completion: reply.text, model_version: reply.version, finish_reason: reply.finish,
                       usage: { completion_tokens: reply.tokens }, timings: { total_ms: ms, tokens_per_s: (reply.tokens / ms * 1000).toFixed(1) } });
      return;
    }
    if (chunk.error) { handle("error", chunk); return; }
    reply.id = chunk.id; reply.version = chunk.system_fingerprint;
    for (const c of chunk.choices) {
      if (c.finish_reason) reply.finish = c.finish_reason;
      const lp = c.logprobs && c.logprobs.content ? c.logprobs.content : [];
      for (const t of lp) { addToken({ text: t.token, prob: Math.exp(t.logprob) }); reply.tokens += 1; }
      const text = c.delta && c.delta.content;
      if (text) { reply.text += text; if (!lp.length) addToken({ text }); }
    }
  });
}

// POST body to url and call onEvent(event, data) for each server-sent event (data parsed; "[DONE]" as is)
async function stream(url, body, onEvent) {
    const r = await fetch(url, { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) { setStatus(errorText(await r.json().catch(() => null), `HTTP ${r.status}`), "err"); return; }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data += line.slice(6);
        }
        onEvent(event, data === "[DONE]" ? data : data ? JSON.parse(data) : null);
      }
    }
}

function handle(event, data) {
  if (event === "start") { $("model").textContent = `version ${data.model_version}`; }
  else if (event === "token") { addToken(data); }
  else if (event === "text") { addToken({ text: data.text }); }
  else if (event === "done") {
    current = data;
    const t = data.timings;
    $("meta").textContent = `${data.usage.completion_tokens} tokens · ${t.total_ms.toFixed(0)} ms · ` +
      `${t.tokens_per_s} tok/s · finish: ${data.finish_reason} · version ${data.model_version} · id ${data.generation_id.slice(0, 8)}`;
    setStatus("done — was this good?"); setFeedbackEnabled(true);
    $("completion").dataset.generationId = data.generation_id;
  } else if (event === "error") { setStatus(errorText(data, "generation failed"), "err"); }
}

async function sendFeedback(rating, correction) {
  if (!current) return;
  const body = { generation_id: current.generation_id, rating };
  if (correction !== undefined) body.correction = correction;
  try {
    const r = await fetch("/v1/feedback", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    const res = await r.json();
    if (!r.ok) { setStatus(errorText(res, `HTTP ${r.status}`), "err"); return false; }
    if ($("token").value) localStorage.setItem("lmops-token", $("token").value);
    setStatus(correction !== undefined ? "correction saved — thank you" : "feedback saved — thank you", "ok");
    return true;
  } catch (e) { setStatus("feedback failed: " + e.message, "err"); return false; }
}

$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(); });
$("chat").addEventListener("change", chatMode);
$("colour").addEventListener("change", () => $("output").classList.toggle("colour", $("colour").checked));
$("up").addEventListener("click", async () => { if (await sendFeedback(1)) { $("up").classList.add("chosen"); $("down").classList.remove("chosen"); } });
$("down").addEventListener("click", async () => { if (await sendFeedback(-1)) { $("down").classList.add("chosen"); $("up").classList.remove("chosen"); } });
$("edit").addEventListener("click", () => { $("editor").hidden = false; $("correction").value = current ? current.completion : ""; $("correction").focus(); });
$("cancel-correction").addEventListener("click", () => { $("editor").hidden = true; });
$("submit-correction").addEventListener("click", async () => {
  if (await sendFeedback(-1, $("correction").value)) $("editor").hidden = true;
});
$("output").classList.add("colour");
loadInfo();
