// lmops playground: streams a completion over SSE (fetch + ReadableStream), colours tokens by
// probability, and sends thumbs up/down or a corrected completion to /v1/feedback.
"use strict";
const $ = (id) => document.getElementById(id);
let current = null; // {generation_id, completion, model_version}
let controller = null;

function bucket(p) { return p < 0.1 ? 0 : p < 0.3 ? 1 : p < 0.5 ? 2 : p < 0.75 ? 3 : 4; }
function setStatus(text, kind) { const s = $("status"); s.textContent = text; s.className = "status " + (kind || ""); }
function headers() {
  const h = { "Content-Type": "application/json" };
  const t = $("token").value || localStorage.getItem("lmops-token");
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}
function errorText(body, fallback) {
  return body && body.error ? `${body.error.field ? body.error.field + ": " : ""}${body.error.message}` : fallback;
}

async function loadInfo() {
  try {
    const r = await fetch("/v1/info");
    const info = await r.json();
    const pill = $("model");
    if (info.ready) { pill.textContent = `${info.model_name} · version ${info.model_version}`; pill.classList.remove("bad"); }
    else { pill.textContent = "model loading…"; pill.classList.add("bad"); setTimeout(loadInfo, 1000); }
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

async function generate() {
  const prompt = $("prompt").value;
  if (!prompt) { setStatus("type a prompt first", "err"); return; }
  current = null; setFeedbackEnabled(false); $("editor").hidden = true;
  for (const id of ["up", "down"]) $(id).classList.remove("chosen");
  $("prompt-echo").textContent = prompt; $("completion").textContent = ""; $("meta").textContent = "";
  setStatus("generating…");
  const body = {
    prompt, stream: true, logprobs: true,
    max_new_tokens: parseInt($("max_new_tokens").value || "64", 10),
    temperature: parseFloat($("temperature").value || "0.8"),
    top_p: parseFloat($("top_p").value || "1"),
  };
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  controller = new AbortController();
  $("generate").disabled = true; $("stop").hidden = false;
  try {
    const r = await fetch("/v1/generate", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
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
        handle(event, data ? JSON.parse(data) : null);
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") setStatus("request failed: " + e.message, "err"); else setStatus("stopped");
  } finally {
    $("generate").disabled = false; $("stop").hidden = true; controller = null;
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
