"""The OpenAI wire protocol (pydantic), ordered like the OpenAI API reference, plus our `t2` extensions.

Contract: request models validate types and ranges (a violation is a 400 naming the field); unknown extra
fields are ignored, as OpenAI clients send fields we don't use. Fields of the OpenAI API that we do not
implement are accepted only at their neutral value (checked in serving, answered with a clear 400); those
not used anywhere else are declared once, in `_ChatRefused` / `_CompletionRefused` (REFUSED lists them).
Everything that is ours, not OpenAI's, sits in the one fenced block below, each field with a description.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from experts.dispatch import Strategy


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ================================ t2 extensions (ours, not OpenAI's) ================================
class T2RequestOptions(_Request):
    """Request extension `t2`: how this request's weights are chosen."""

    dispatch: Optional[Strategy] = Field(
        None, description="Override the server's default dispatch strategy for this request: "
        "explicit | prompt | classifier | none.")
    experts: Optional[dict[str, float]] = Field(
        None, description="Explicit mix: expert name → weight ≥ 0 (normalised to sum 1). Implies "
        "dispatch=explicit.")


class T2Report(BaseModel):
    """Response extension `t2`: what the dispatch decided and what the two passes cost."""

    strategy: Strategy = Field(description="The dispatch strategy that ran.")
    label: Optional[str] = Field(None, description="The first pass's label (prompt/classifier strategies).")
    label_probs: Optional[dict[str, float]] = Field(
        None, description="The first pass's probability of each label (renormalised over the labels).")
    mix: dict[str, float] = Field(description="Experts and weights of the second pass; empty = base weights.")
    adaptation: str = Field(description="The adaptation key (also the grouping key of the scheduler).")
    first_pass_ms: float = Field(description="Wall time of the dispatch pass, queueing included.")
    patch_ms: float = Field(description="Time of the weight swap the second pass needed (0 if none).")
    queue_ms: float = Field(description="Time the second pass waited for its batch and weights.")
    path: Optional[Literal["dense", "factored"]] = Field(
        None, description="How the adapted layers computed the second pass: dense (patched or base weights) "
        "or factored (per-row gains, in a batch that may mix adaptations).")


class T2Usage(BaseModel):
    dispatch_tokens: int = Field(0, description="Tokens computed by the first (dispatch) pass.")
# ====================================================================================================


# ---- OpenAI fields we do not implement: declared so that serving can refuse them (400 naming the field) ----
class _ChatRefused(_Request):
    audio: Optional[Any] = None
    function_call: Optional[Any] = None
    functions: Optional[Any] = None
    modalities: Optional[list[str]] = None            # neutral: ["text"]
    prediction: Optional[Any] = None
    reasoning_effort: Optional[str] = None
    service_tier: Optional[str] = None                # neutral: "auto" | "default"
    store: Optional[bool] = None                      # neutral: false
    metadata: Optional[dict[str, Any]] = None         # only meaningful with store
    web_search_options: Optional[Any] = None
    verbosity: Optional[str] = None


class _CompletionRefused(_Request):
    best_of: Optional[int] = None                     # neutral: 1


# name → the values that mean "not used" (None always does)
REFUSED: dict[str, tuple[Any, ...]] = {
    "audio": (), "function_call": (), "functions": (), "modalities": (["text"],), "prediction": (),
    "reasoning_effort": (), "service_tier": ("auto", "default"), "store": (False,), "metadata": ({},),
    "web_search_options": (), "verbosity": (), "best_of": (1,)}


# ---- shared ----
class StreamOptions(_Request):
    include_usage: bool = False


class Usage(T2Usage):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---- chat completions ----
class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_ChatRefused):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id → bias in [-100, 100] added "
                                                   "to its logit before sampling.")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1, description="Deprecated alias of max_completion_tokens.")
    n: int = Field(1, ge=1)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    tools: Optional[list[dict[str, Any]]] = None
    user: Optional[str] = None
    # vLLM-compatible extra (used by `vllm bench serve`)
    ignore_eos: bool = False
    # ours
    t2: Optional[T2RequestOptions] = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[list[TokenLogprobInfo]] = None
    refusal: Optional[list[TokenLogprobInfo]] = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: response_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    t2: T2Report


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Optional[str] = None
    logprobs: Optional[ChoiceLogprobs] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    t2: Optional[T2Report] = None


# ---- completions (legacy) ----
class CompletionRequest(_CompletionRefused):
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        description="Text, or token ids; a list must hold exactly one prompt.")
    echo: bool = Field(False, description="Put the prompt before the completion (with its logprobs).")
    frequency_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = Field(None, description="Token id → bias in [-100, 100] added "
                                                   "to its logit before sampling.")
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    max_tokens: Optional[int] = Field(16, ge=0, description="0 only with echo (score the prompt).")
    n: int = Field(1, ge=1)
    presence_penalty: Optional[float] = Field(0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    suffix: Optional[str] = None
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    user: Optional[str] = None
    ignore_eos: bool = False
    t2: Optional[T2RequestOptions] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: response_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    t2: Optional[T2Report] = None


# ---- models ----
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "t2"
    # ours
    t2: Optional[dict[str, Any]] = Field(None, description="Kind (base | auto | expert), label, description.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
