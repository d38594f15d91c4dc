"""The OpenAI request bodies the server accepts (pydantic: types and ranges checked before any
work, each problem a 400 naming the field) and the error body it answers with.

Fields the server cannot honour are refused when set to a value that would change the result
(`logit_bias`, non-zero penalties, `best_of` other than `n`, `echo`, `suffix`), so a client
never gets output it did not ask for; fields that change nothing here (`user`, `metadata`,
`store`, `parallel_tool_calls`, ...) are accepted and ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

# reasoning_effort -> (encoding thinking_mode, encoding reasoning_effort); the V4 chat format
# has three modes: non-think, think high, think max
REASONING = {None: ("chat", None), "none": ("chat", None), "high": ("thinking", "high"),
             "max": ("thinking", "max")}


class APIError(Exception):
    """A request the server refuses: HTTP `status` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (status, message, param,
                                                                       kind, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)           # an extension (vLLM has it too); 0 = off
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty/frequency_penalty: not supported (leave them 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        stops = self.stop_list()
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(16, ge=1)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _completion_supported(self):
        if self.echo:
            raise ValueError("echo: not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of = n is supported")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts, each a text or token ids (OpenAI's four shapes)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]
        if not p:
            raise APIError(400, "prompt: empty", "prompt")
        return list(p)


class ChatRequest(_Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    reasoning_effort: Optional[Literal["none", "high", "max"]] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat_supported(self):
        if self.tool_choice not in (None, "auto", "none"):
            raise ValueError("tool_choice: only 'auto' and 'none' are supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs=true")
        return self

    @property
    def limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    @property
    def modes(self) -> tuple[str, Optional[str]]:
        return REASONING[self.reasoning_effort]
