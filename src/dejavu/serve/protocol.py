"""The OpenAI request schema as this server takes it, the OpenAI error object, and the checks that
turn a request into something the scheduler can run (or into a 4xx that names the problem).

Clients send OpenAI fields with their default values (`n: 1`, `frequency_penalty: 0`, `logprobs:
null`, `tools: []`...): those are accepted; a value this server cannot honour is refused by name.
Numbers are strict (`max_tokens: true` is not 1); fields this server does not know are refused.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

StrictPositive = Annotated[int, Field(ge=1, strict=True)]
Number = Annotated[float, Field(strict=True)]  # an int or a float, never a bool or a string
TokenId = Annotated[int, Field(ge=0, strict=True)]


def no_surrogates(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"): not text, and no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds an unpaired surrogate ({text[e.start]!r} at character {e.start}): "
                         "send valid UTF-16 pairs or plain UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(no_surrogates)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # unknown fields are refused with their name


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]  # json_object / json_schema would need constrained decoding


class Sampling(Strict):
    model: str
    max_tokens: StrictPositive | None = None
    temperature: Annotated[float, Field(ge=0, le=2, strict=True)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, strict=True)] = 1.0
    n: Annotated[int, Field(ge=1, le=1, strict=True)] = 1  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Annotated[int, Field(ge=-2 ** 63, lt=2 ** 64, strict=True)] | None = None  # torch.Generator's range
    user: str | None = None
    ignore_eos: bool = False  # an extension (as vLLM's): run to max_tokens, for load tests and benchmarks
    # OpenAI fields accepted at the values that change nothing (checked in `unsupported`)
    frequency_penalty: Number = 0
    presence_penalty: Number = 0
    logit_bias: dict[str, Number] | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    logprobs: Annotated[int, Field(strict=True)] | bool | None = None
    echo: bool = False
    best_of: Annotated[int, Field(strict=True)] | None = None
    suffix: str | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictPositive | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(strict=True)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | None = None  # with no tools, both mean plain text
    parallel_tool_calls: bool | None = None


# (field, the values it may take here, what to say) for fields accepted at their defaults only
DEFAULT_ONLY = (
    ("frequency_penalty", lambda v: v == 0, "0"),
    ("presence_penalty", lambda v: v == 0, "0"),
    ("logit_bias", lambda v: not v, "null or {}"),
    ("logprobs", lambda v: v is None or v is False, "null or false"),
    ("top_logprobs", lambda v: v is None or v == 0, "null or 0"),
    ("echo", lambda v: v is False, "false"),
    ("best_of", lambda v: v is None or v == 1, "null or 1"),
    ("suffix", lambda v: v is None, "null"),
    ("tools", lambda v: not v, "null or []"),
)


def unsupported(req: Sampling) -> None:
    """Refuse the first OpenAI field whose value this server cannot honour, by name."""
    for name, ok, allowed in DEFAULT_ONLY:
        if name in type(req).model_fields and not ok(getattr(req, name)):
            raise ApiError(400, f"{name}={getattr(req, name)!r} is not supported by this server (it takes "
                                f"{allowed})", param=name)


def prompt_of(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    p = req.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise ApiError(400, f"prompt: one prompt per request, got {len(p)} (send them as separate requests; "
                                "the server batches them)", param="prompt")
        p = p[0]
    return p


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


UNION_BRANCHES = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's names for a union's members


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem in words that name the field, e.g. "unknown field 'foo'"."""
    e = exc.errors()[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and str(x) not in UNION_BRANCHES and "[" not in str(x)]
    where = ".".join(loc) or "body"
    if e["type"] == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})", None
    if e["type"] == "extra_forbidden":
        return f"unknown field '{where}': this server takes the OpenAI fields it implements only", where
    if e["type"] == "missing":
        return f"missing field '{where}'", where
    got = repr(e.get("input"))
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{where}: {e['msg']} (got {got})", where.split(".")[0]
