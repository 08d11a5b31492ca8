"""Request and response bodies of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``), as the official ``openai`` client sends and reads them.

Requests take OpenAI's parameters with OpenAI's defaults and ranges. Parameters this server does not
implement are accepted at their neutral value (``frequency_penalty: 0``, ``tools: []``, ...) and refused
with a 422 naming them otherwise (:func:`unsupported_param`); any other unknown field is ignored, as
OpenAI-compatible servers do, so clients that send newer fields keep working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmcore.serve.schemas import STOP_DESCRIPTION, TOP_LOGPROBS_DESCRIPTION, Stop

# OpenAI parameters with no implementation here -> the values that ask for nothing (anything else: 422)
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}


def unsupported_param(extra: dict[str, Any] | None) -> str | None:
    """The first field of ``extra`` that asks for a feature this server lacks, or None."""
    for key, value in (extra or {}).items():
        if key in NEUTRAL and value not in NEUTRAL[key]:
            return key
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(False, description="Send a last chunk (with no choices) carrying the usage.")


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="allow")  # see unsupported_param

    model: str = Field(..., min_length=1, description="The id GET /v1/models lists (the served model's name).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling mass; 1 = off, 0 = greedy.")
    n: int = Field(1, ge=1, description="Choices per prompt; choices in all at most serve.max_batch.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1,
                             description="Same seed, same text; choice k samples with seed + k.")
    stop: Stop = Field(None, description=STOP_DESCRIPTION)
    stream: bool = Field(False, description="Server-sent events: one chunk per token, then `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    ignore_eos: bool = Field(False, description="vLLM's extension: keep generating past end-of-text "
                             "(fixed-length load tests).")


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(..., description="Text to continue, or a list of texts (choices per text: n).")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most (capped by serve.max_new_tokens).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of each token and of the k most "
                                 "likely ones (0-5), under the model's own distribution.")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        ..., description="developer is treated as system.")
    content: str | list[TextPart] | None = Field(..., description="Text, or a list of text parts (joined).")
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most; default serve.max_new_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens (wins over it).")
    logprobs: bool = Field(False, description="Log-probability of each token, under the model's own distribution.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description=TOP_LOGPROBS_DESCRIPTION)



class ChatRenderRequest(BaseModel):
    """lmops' own: what the playground sends to show a chat model's formatted prompt before it asks."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far.")


class ChatRender(BaseModel):
    prompt: str = Field(..., description="The text the model is given: the messages through its chat template, "
                        "ending where the assistant's reply begins.")
    template: Literal["model", "default"] = Field(..., description="The model's own chat template, or lmops' "
                                                  "default (a model without one).")

# -- responses (documented in the OpenAPI schema; built as plain dicts) -------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="invalid_request_error, authentication_error, permission_error, "
                      "not_found_error, rate_limit_error, timeout_error or server_error.")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = Field(None, description="The server's machine-readable code (as in the native API).")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = Field(..., description="stop (end of text or a stop sequence), length, or timeout.")


class _Answer(BaseModel):
    id: str = Field(..., description="The generation id of choice 0, for POST /v1/feedback (choice k: `<id>-<k>`).")
    created: int
    model: str
    system_fingerprint: str = Field(..., description="The model version that generated the text.")


class Completion(_Answer):
    object: Literal["text_completion"]
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int = Field(..., description="When this version was loaded (Unix seconds).")
    owned_by: str
    version: str = Field(..., description="The model version served.")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
