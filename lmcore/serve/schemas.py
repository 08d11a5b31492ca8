"""Request and response bodies of the HTTP API; their field descriptions become the OpenAPI schema."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

# Stop sequences as OpenAI takes them: one string or up to four, each non-empty (one string is a list of one).
StopText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
_STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                          {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256},
                           "maxItems": 4},
                          {"type": "null"}]}
Stop = Annotated[list[StopText] | None, Field(max_length=4), WithJsonSchema(_STOP_SCHEMA),
                 BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]
STOP_DESCRIPTION = ("Stop sequences (a string or up to 4): generation ends before the first one; it is not "
                    "part of the output. Streams hold back text that could begin one.")
TOP_LOGPROBS_DESCRIPTION = "With logprobs: also the k most likely tokens at each step (0-20)."


MAX_SEED = 2**63 - 1  # a signed 64-bit integer: what torch's generators (and SQL BIGINT) take


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., description="Text to continue. Longer than serve.max_prompt_chars -> 413.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens to generate at most (capped by serve.max_new_tokens).")
    temperature: float = Field(0.8, ge=0.0, le=5.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1 = off.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 = off.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Seed for this request's own RNG: same seed, "
                             "same text.")
    stream: bool = Field(False, description="Stream tokens as server-sent events (start, token..., done).")
    logprobs: bool = Field(False, description="Also return every generated token with its probability and "
                           "log-probability.")
    top_logprobs: int = Field(0, ge=0, le=20, description=TOP_LOGPROBS_DESCRIPTION)
    stop: Stop = Field(None, description=STOP_DESCRIPTION)
    ignore_eos: bool = Field(False, description="Keep generating past end-of-text (fixed-length load tests).")


class TopLogprob(BaseModel):
    id: int = Field(..., description="Token id.")
    text: str = Field(..., description="The token's text (U+FFFD where it holds part of a UTF-8 character).")
    logprob: float


class TokenProb(BaseModel):
    id: int = Field(..., description="Token id.")
    text: str = Field(..., description="Text this token added (empty while a UTF-8 character is incomplete).")
    prob: float = Field(..., description="Probability of the token under the sampling distribution.")
    logprob: float | None = Field(None, description="With logprobs: log-probability of the token under the model's "
                                  "own distribution (temperature 1, no top-k/top-p), as OpenAI-compatible servers "
                                  "report it.")
    top_logprobs: list[TopLogprob] | None = Field(None, description="The top_logprobs most likely tokens there.")



class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="Prompt tokens fed to the model (its last serve.max_prompt_chars "
                                                "tokens, at most block_size).")
    completion_tokens: int = Field(..., description="Tokens generated.")


class Timings(BaseModel):
    queue_ms: float = Field(..., description="From arrival to the first token (queueing + prefill).")
    total_ms: float = Field(..., description="From arrival to the last token.")
    tokens_per_s: float = Field(..., description="Generated tokens per second of total time.")


class GenerateResponse(BaseModel):
    generation_id: str = Field(..., description="Id to send feedback about this completion.")
    model_name: str = Field(..., description="Registered model name (or folder name).")
    model_version: str = Field(..., description="Model version that produced the completion.")
    completion: str = Field(..., description="Generated text.")
    finish_reason: Literal["eos", "stop", "length", "timeout", "cancelled"] = Field(
        ..., description="Why generation stopped (stop: a stop sequence).")
    tokens: list[TokenProb] | None = Field(None, description="Per-token probabilities (with logprobs: true).")
    usage: Usage
    timings: Timings


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation_id: str = Field(..., min_length=1, max_length=64, description="Id returned by /v1/generate.")
    rating: Literal[-1, 1] = Field(..., description="+1 thumbs up, -1 thumbs down.")
    correction: str | None = Field(None, description="A better completion, used for training by the harvest.")
    comment: str | None = Field(None, description="Free text for people; never trained on.")


class FeedbackResponse(BaseModel):
    ok: bool = True
    feedback_id: int = Field(..., description="Sequence number of the stored row.")
    generation_id: str


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="models:/<name>@<alias> or a folder; default: the URI being served.")


class ReloadResponse(BaseModel):
    ok: bool = Field(..., description="False when the new version failed to load (the old one keeps serving).")
    swapped: bool = Field(..., description="True when a different version is now served.")
    version: str | None = Field(..., description="Version served after the reload.")
    previous: str | None = Field(..., description="Version served before.")
    error: str | None = Field(None, description="Why loading failed.")
    field: str | None = Field(None, description="The request field at fault when loading failed: model.")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="Machine-readable error code.")
    field: str | None = Field(None, description="The request field (or header) at fault.")
    message: str
    limit: str | None = Field(None, description="The params key of the limit that was exceeded.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
