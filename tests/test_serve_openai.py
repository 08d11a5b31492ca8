"""The OpenAI-compatible API against a live uvicorn server, driven by the official ``openai`` client
(sync, async, streaming), and stop sequences (native API too, and the stop filter on its own)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from _serve_helpers import make_model, parse_sse, thread_server

from lmcore.config import Params, ServeParams
from lmcore.serve.stops import StopFilter

pytestmark = pytest.mark.code

# the module's model carries its own chat template (as a Hugging Face base would)
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PARAMS = Params(serve=ServeParams(compile_decode=False, max_prompt_chars=300, max_new_tokens=48, max_concurrent=16,
                                  max_batch=4, poll_interval_s=0))
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = make_model(tmp_path_factory.mktemp("models") / "chatty", seed=1)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def server(model_dir, store):
    from lmcore.serve.app import create_app

    with thread_server(create_app(str(model_dir), PARAMS, store=store, api_token="")) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


SEED = 4  # any seed whose first token is not end-of-text for this random model


def complete(client, prompt="the quick brown fox", **kw):
    args = {"model": "chatty", "prompt": prompt, "max_tokens": 24, "temperature": 1.0, "seed": SEED, **kw}
    return client.completions.create(**args)


# -- the stop filter on its own -----------------------------------------------------------------------
def _run_filter(stops, pieces, tail=""):
    f = StopFilter(stops)
    out = []
    for i, p in enumerate(pieces):
        out.append([r["text"] for r in f.push({"id": i, "text": p})])
    recs, rest = f.finish(tail)
    return out, [r["text"] for r in recs], rest, f.stopped


def test_stop_filter_holds_back_a_straddling_prefix_and_cuts_at_the_first_stop():
    steps, last, rest, stopped = _run_filter(["END", "xy"], ["ab", "cE", "N", "D", "more"])
    assert steps == [["ab"], [], [], ["c"], []] and stopped and last == [] and rest == ""
    steps, last, _, stopped = _run_filter(["END"], ["aE", "N", "x"])  # a prefix that did not become a stop
    assert steps == [[], [], ["aE", "N", "x"]] and not stopped
    steps, _, _, _ = _run_filter(["xy", "abc"], ["zab", "xy"])  # the earliest stop wins
    assert steps == [[], ["zab"]]
    steps, last, rest, stopped = _run_filter(["é!"], ["aé"], tail="!z")  # the flushed tail completes a stop
    assert steps == [[]] and last == ["a"] and rest == "" and stopped
    steps, last, rest, stopped = _run_filter(["é!"], ["a", ""], tail="é!z")  # ... or is one by itself
    assert steps == [["a"], [""]] and last == [] and rest == "" and stopped
    steps, last, rest, stopped = _run_filter([], ["a", "b"], tail="c")  # no stops: everything at once
    assert steps == [["a"], ["b"]] and rest == "c" and not stopped


# -- models ---------------------------------------------------------------------------------------------
def test_models_list_and_retrieve(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["chatty"] and models[0].owned_by == "lmops"
    assert client.models.retrieve("chatty").id == "chatty"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert set(e.value.body) == ERROR_KEYS and e.value.body["param"] == "model"


# -- completions ----------------------------------------------------------------------------------------
def test_completion_is_logged_under_its_id_and_takes_feedback(client, server, store):
    r = complete(client)
    text = r.choices[0].text
    assert r.object == "text_completion" and r.model == "chatty" and r.system_fingerprint.startswith("local-")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    row = store.get_generation(r.id)
    assert row["prompt"] == "the quick brown fox" and row["completion"] == text
    assert row["completion_tokens"] == r.usage.completion_tokens and row["prompt_tokens"] == r.usage.prompt_tokens
    assert json.loads(row["params"])["seed"] == SEED
    fb = httpx.post(server + "/v1/feedback", json={"generation_id": r.id, "rating": -1, "correction": "jumps"})
    assert fb.status_code == 200, fb.text
    assert [f["correction"] for f in store.feedback_for(r.id)] == ["jumps"]


def test_n_choices_are_generations_of_their_own(client, store):
    r = complete(client, prompt="abc", n=3, seed=11)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = [r.id, f"{r.id}-1", f"{r.id}-2"]
    assert [store.get_generation(i)["completion"] for i in ids] == [c.text for c in r.choices]
    assert r.usage.prompt_tokens == 3  # the prompt counts once (three bytes)
    assert r.usage.completion_tokens == sum(store.get_generation(i)["completion_tokens"] for i in ids)
    assert complete(client, prompt="abc", seed=12).choices[0].text == r.choices[1].text  # choice k: seed + k


def _stop_in(text: str) -> tuple[str, int]:
    """A two-character stop string first found in the middle of ``text``, and where."""
    for p in range(3, len(text) - 2):
        s = text[p : p + 2]
        if text.find(s) == p:
            return s, p
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_sequences_cut_completions_native_generate_and_both_streams(client, server, store):
    base = complete(client, max_tokens=40).choices[0].text
    stop, at = _stop_in(base)
    r = complete(client, max_tokens=40, stop=["never-there", stop])
    assert r.choices[0].text == base[:at] and r.choices[0].finish_reason == "stop"
    assert json.loads(store.get_generation(r.id)["params"])["stop"] == ["never-there", stop]
    streamed = list(complete(client, max_tokens=40, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == base[:at]
    assert streamed[-1].choices[0].finish_reason == "stop"
    native = {"prompt": "the quick brown fox", "max_new_tokens": 40, "temperature": 1.0, "seed": SEED, "stop": stop}
    body = httpx.post(server + "/v1/generate", json=native).json()
    assert body["completion"] == base[:at] and body["finish_reason"] == "stop"
    with httpx.stream("POST", server + "/v1/generate", json={**native, "stream": True}) as resp:
        events = parse_sse(resp.read().decode())
    assert "".join(d["text"] for k, d in events if k in ("token", "text")) == base[:at]  # held back, never shown
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "stop"


def test_completion_logprobs_are_the_models_own(client):
    r = complete(client, temperature=0, max_tokens=10, logprobs=3)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert len(lp.tokens) == r.usage.completion_tokens and "".join(lp.tokens) == text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the model's argmax


def test_streamed_completion_equals_the_plain_one(client):
    plain = complete(client, n=2)
    chunks = list(complete(client, n=2, stream=True, stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {chunks[0].id}
    for k in range(2):
        assert "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == k) == \
            plain.choices[k].text
    finals = {c.choices[0].index: c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason}
    assert finals == {k: plain.choices[k].finish_reason for k in range(2)}
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()


# -- chat -------------------------------------------------------------------------------------------------
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
RENDERED = "<|system|>be brief\n<|user|>hi\n<|assistant|>"


def test_chat_uses_the_models_template_sync_async_and_streamed(server, client, store):
    chat = client.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=16, seed=5)
    content = chat.choices[0].message.content
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert store.get_generation(chat.id)["prompt"] == RENDERED  # logged as the model saw it
    assert complete(client, prompt=RENDERED, max_tokens=16, seed=5).choices[0].text == content

    async def async_side():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60) as ac:
            one = await ac.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=16, seed=5)
            stream = await ac.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=16, seed=5,
                                                      stream=True, stream_options={"include_usage": True})
            return one, [c async for c in stream]

    one, chunks = asyncio.run(async_side())
    assert one.choices[0].message.content == content and one.id != chat.id
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_chat_logprobs_and_top_logprobs(client):
    chat = client.chat.completions.create(model="chatty", messages=MESSAGES, max_tokens=8, seed=2,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob and t.logprob <= t.top_logprobs[0].logprob


def test_default_template_is_the_messages_run_together(tmp_path, store):
    """Without a chat template a one-message chat is served exactly as the completion of that message."""
    from lmcore.serve.app import create_app

    folder = make_model(tmp_path / "plain", seed=1)
    with thread_server(create_app(str(folder), PARAMS, store=store, api_token="")) as base, \
            openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60) as c:
        chat = c.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=12, seed=4)
        text = c.completions.create(model="plain", prompt="hello", max_tokens=12, seed=4).choices[0].text
    assert chat.choices[0].message.content == text and store.get_generation(chat.id)["prompt"] == "hello"


# -- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", {"model": "chatty", "prompt": "x", "temperature": 3}, 422, "temperature"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "max_tokens": 49}, 422, "max_tokens"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "n": 5}, 422, "n"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ("/v1/completions", {"model": "chatty", "prompt": "x" * 301}, 413, "prompt"),
    ("/v1/completions", {"model": "chatty", "prompt": "x", "presence_penalty": 0.5}, 422, "presence_penalty"),
    ("/v1/completions", {"model": "chatty", "prompt": []}, 422, "prompt"),
    ("/v1/completions", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"prompt": "x"}, 422, "model"),
    ("/v1/chat/completions", {"model": "chatty", "messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"model": "chatty", "messages": [{"role": "robot", "content": "x"}]}, 422,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "chatty", "messages": MESSAGES, "top_logprobs": 2}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"model": "chatty", "messages": MESSAGES, "max_completion_tokens": 99}, 422,
     "max_completion_tokens"),
])
def test_errors_have_openais_shape_and_name_the_field(server, path, body, status, param):
    r = httpx.post(server + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS and err["param"] == param and err["message"]
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_bad_json_and_client_errors(server, client):
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert complete(client, presence_penalty=0, frequency_penalty=0.0, user="u").choices  # neutral values pass
    with pytest.raises(openai.UnprocessableEntityError) as e:
        complete(client, temperature=2.5)
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"


def test_openapi_schema_documents_the_openai_routes(server):
    spec = httpx.get(server + "/openapi.json").json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[-1] in spec["components"]["schemas"]
        assert "OpenAIErrorResponse" in json.dumps(spec["paths"][path]["post"]["responses"]["422"])
    assert "/v1/models" in spec["paths"] and "/v1/models/{model}" in spec["paths"]


def test_a_vanishing_temperature_samples_as_greedy_and_the_server_carries_on(server, client):
    """1e-300 divided float32 logits to inf: NaN probabilities stopped the decode loop (found by fuzzing)."""
    greedy = complete(client, temperature=0, max_tokens=8).choices[0].text
    assert complete(client, temperature=1e-300, max_tokens=8).choices[0].text == greedy
    native = {"prompt": "the quick brown fox", "temperature": 5e-324, "max_new_tokens": 8}
    r = httpx.post(server + "/v1/generate", json=native, timeout=30)
    assert r.status_code == 200 and r.json()["completion"] == greedy


def test_a_client_leaving_a_stream_frees_its_slots(server, client):
    """Every choice holds a concurrency slot; leaving mid-stream cancels the choices and frees them all."""
    stream = complete(client, n=3, max_tokens=48, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health").json()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["in_flight"] == 0
