"""OpenAI request/response models (pydantic v2).

Requests accept unknown fields (clients send many) but every field we read is typed and bounded, so
bad values are a 400 and nothing unbounded reaches msgpack. Tandem extensions (as in vLLM):
`priority`, `ignore_eos`, `min_tokens`, `return_token_ids`, `top_k`, `stop_token_ids`, and
`prompt` as token ids.
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
MAX_TOKENS_LIMIT = 2 ** 31 - 1
TokenId = Field(ge=0, le=2 ** 31 - 1)

Priority = Literal["interactive", "standard", "batch"]


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Req):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = False


class _GenParams(_Req):
    model: Optional[str] = Field(None, description="served model name (optional: defaults to the served model)")
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    n: Optional[int] = Field(1, ge=1, le=128, description="only 1 is supported")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = Field(None, description="up to 16 stop strings")
    seed: Optional[int] = Field(None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    logit_bias: Optional[dict[str, float]] = Field(None, description="not supported (must be empty)")
    user: Optional[str] = None
    # extensions
    priority: Optional[Priority] = Field(None, description="Tandem: scheduling class (default interactive)")
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[int] = Field(0, ge=0, le=MAX_TOKENS_LIMIT)
    return_token_ids: Optional[bool] = False
    top_k: Optional[int] = Field(None, ge=-1, le=MAX_TOKENS_LIMIT, description="0 or -1 disables")
    stop_token_ids: Optional[list[int]] = Field(None, max_length=64)


class TextPart(_Req):
    type: str = "text"
    text: Optional[str] = None


class ChatMessage(_Req):
    role: str
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None


class ResponseFormat(_Req):
    type: str = "text"


class ChatCompletionRequest(_GenParams):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    add_generation_prompt: Optional[bool] = True


PromptType = Union[str, list[int], list[Union[str, list[int]]]]


class CompletionRequest(_GenParams):
    prompt: PromptType = Field(description="text, list of texts, token ids, or list of token-id lists")
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=128, description="only 1 is supported")


# ----------------------------------------------------------------------------- responses
class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Resp):
    cached_tokens: int = 0


class Usage(_Resp):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionChoice(_Resp):
    index: int
    text: str
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class CompletionResponse(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatResponseMessage(_Resp):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(_Resp):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Resp):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(_Resp):
    error: ErrorInfo
