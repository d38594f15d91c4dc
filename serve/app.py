"""The OpenAI-compatible HTTP API over one checkpoint (FastAPI on uvicorn).

    POST /v1/chat/completions   V4 chat format, reasoning_effort none|high|max, tools (DSML),
                                n, stream, logprobs/top_logprobs, stop, seed
    POST /v1/completions        text or token-id prompts (one or many), n, stream, logprobs
    GET  /v1/models, /health

Every request becomes engine requests (`serve/worker.py`), so concurrent clients share one
continuous batch, and the n samples of a prompt share its prefill. Bad requests are refused
before they reach the engine with OpenAI's error body: 400 for a malformed body, a field out of
range, messages the V4 encoder rejects, or a prompt (plus `max_tokens`) longer than the
context; 404 for an unknown model. Log-probs are the model's own (temperature 1, full
vocabulary), as OpenAI reports them; they come with non-streaming responses.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from model.engine import Engine
from model.speculative_engine import SpeculativeEngine

from .protocol import APIError, ChatRequest, CompletionRequest
from .text import ChatStream, ChoiceText, chat_message, chat_prompt, finish_reason
from .worker import EngineWorker


class Server:
    """What the routes share: the model, its tokenizer, the engine thread."""

    def __init__(self, model, tokenizer, name: str, max_batch: int = 32,
                 speculative: bool = False):
        self.model, self.tokenizer, self.name, self.max_batch = model, tokenizer, name, max_batch
        self.engine_class = SpeculativeEngine if speculative else Engine
        self.context = model.cfg.max_seq_len
        self.worker = EngineWorker(self.make_engine)

    def make_engine(self) -> Engine:
        return self.engine_class(self.model, max_batch=self.max_batch,
                                 eos_id=self.tokenizer.eos_token_id, return_logprobs=True,
                                 decode=lambda ids: self.tokenizer.decode(
                                     ids, skip_special_tokens=False))

    def check(self, req, prompts: list[list[int]], limit: int | None) -> int:
        """The model name, the prompts against the context, n against the batch; -> the
        tokens each sample may generate."""
        if req.model != self.name:
            raise APIError(404, f"model {req.model!r} does not exist (this server has "
                                f"{self.name!r})", "model", code="model_not_found")
        if req.n > self.max_batch:
            raise APIError(400, f"n={req.n}: at most {self.max_batch} samples per prompt "
                                f"(the server's max_batch)", "n")
        longest = max(len(p) for p in prompts)
        if longest >= self.context:
            raise APIError(400, f"the prompt is {longest} tokens; this model's context is "
                                f"{self.context} tokens, with at least one for the reply",
                           "messages" if isinstance(req, ChatRequest) else "prompt")
        if limit is not None and longest + limit > self.context:
            raise APIError(400, f"the prompt ({longest} tokens) plus max_tokens ({limit}) "
                                f"exceeds this model's context of {self.context} tokens",
                           "max_tokens")
        return limit if limit is not None else self.context - longest

    def submit(self, req, prompts: list[list[int]], limit: int, top: int, stream: bool):
        """-> (event queue, engine request ids), one request per prompt."""
        queue: asyncio.Queue = asyncio.Queue()
        rids = []
        for i, prompt in enumerate(prompts):
            rids.append(self.worker.submit(
                queue, i, prompt, stream, n=req.n, max_new_tokens=limit,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                seed=None if req.seed is None else req.seed + i,
                stop_strings=req.stop_list(), top_logprobs=top))
        return queue, rids

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        out = []
        for p in req.prompts():
            if isinstance(p, str):
                bos = self.tokenizer.bos_token_id
                out.append(([bos] if bos is not None else [])
                           + self.tokenizer.encode(p, add_special_tokens=False))
            elif not p or any(not 0 <= t < self.model.cfg.vocab_size for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, "
                                    f"{self.model.cfg.vocab_size}) and not empty", "prompt")
            else:
                out.append(list(p))
        return out

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)


async def collect(queue: asyncio.Queue, count: int) -> dict[int, Any]:
    """Waits for `count` requests' "done" events: {tag: Finished}."""
    results: dict[int, Any] = {}
    while len(results) < count:
        kind, tag, *rest = await queue.get()
        if kind == "error":
            raise APIError(500, rest[0], kind="server_error")
        if kind == "done":
            results[tag] = rest[0]
    return results


def usage(prompts: list[list[int]], results: dict[int, Any]) -> dict[str, int]:
    done = sum(len(t) for r in results.values() for t in r.output.tokens)
    given = sum(len(p) for p in prompts)
    return {"prompt_tokens": given, "completion_tokens": done, "total_tokens": given + done}


def chat_logprobs(server: Server, finished, sample: int) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = server.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    tokens = finished.output.tokens[sample]
    raw = finished.output.raw_logprobs[sample].tolist()
    top = finished.top[sample]
    return {"content": [{**entry(t, lp), "top_logprobs": [
        entry(i, v) for i, v in zip(*top[k])] if k < len(top) else []}
        for k, (t, lp) in enumerate(zip(tokens, raw))]}


def completion_logprobs(server: Server, finished, sample: int) -> dict[str, Any]:
    tokens = finished.output.tokens[sample]
    texts = [server.token_text(t) for t in tokens]
    offsets = [sum(len(x) for x in texts[:k]) for k in range(len(texts))]
    top = finished.top[sample]
    return {"tokens": texts, "token_logprobs": finished.output.raw_logprobs[sample].tolist(),
            "top_logprobs": [{server.token_text(i): v for i, v in zip(*top[k])}
                             for k in range(len(top))] or None,
            "text_offset": offsets}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload) if not isinstance(payload, str) else payload}\n\n"


def build_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.worker.close()

    app = FastAPI(title="v4lab", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        errors = error.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            reason = (detail.get("ctx") or {}).get("error", detail.get("msg"))
            return JSONResponse(APIError(400, f"the request body is not valid JSON: "
                                              f"{reason}").body(), status_code=400)

        def where(e) -> str:
            return ".".join(str(x) for x in e["loc"] if x != "body") or "body"

        problems = "; ".join(f"{where(e)}: {e['msg']}" for e in errors)
        param = where(errors[0]) if errors else None
        return JSONResponse(APIError(400, problems, param).body(), status_code=400)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model",
                                            "created": 0, "owned_by": "v4lab",
                                            "max_model_len": server.context}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await complete(server, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await chat_complete(server, req)

    return app


async def complete(server: Server, req: CompletionRequest):
    prompts = server.completion_prompts(req)
    limit = server.check(req, prompts, req.max_tokens)
    queue, rids = server.submit(req, prompts, limit, req.logprobs or 0, req.stream)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": server.name}
    if req.stream:
        return StreamingResponse(stream_completion(server, req, prompts, queue, rids, head),
                                 media_type="text/event-stream")
    results = await collect(queue, len(prompts))
    choices = []
    for i in range(len(prompts)):
        for s in range(req.n):
            text = ChoiceText(server.tokenizer, req.stop_list())
            text.ids = results[i].output.tokens[s]
            choices.append({"index": i * req.n + s, "text": text.text(),
                            "logprobs": completion_logprobs(server, results[i], s)
                            if req.logprobs is not None else None,
                            "finish_reason": finish_reason(results[i].output.finish_reasons[s])})
    return {**head, "choices": choices, "usage": usage(prompts, results)}


async def stream_completion(server, req, prompts, queue, rids, head) -> AsyncIterator[str]:
    texts = {(i, s): ChoiceText(server.tokenizer, req.stop_list())
             for i in range(len(prompts)) for s in range(req.n)}
    sent = {key: 0 for key in texts}

    def chunk(key, text: str, reason=None) -> str:
        return sse({**head, "choices": [{"index": key[0] * req.n + key[1], "text": text,
                                         "logprobs": None, "finish_reason": reason}]})

    results: dict[int, Any] = {}
    try:
        while len(results) < len(prompts):
            kind, tag, *rest = await queue.get()
            if kind == "error":
                yield sse({"error": {"message": rest[0], "type": "server_error"}})
                return
            if kind == "token":
                key = (tag, rest[0])
                texts[key].ids.append(rest[1])
                safe = texts[key].safe()
                if len(safe) > sent[key]:
                    yield chunk(key, safe[sent[key]:])
                    sent[key] = len(safe)
                continue
            results[tag] = rest[0]
            for s in range(req.n):
                final = texts[(tag, s)].text()
                yield chunk((tag, s), final[sent[(tag, s)]:],
                            finish_reason(rest[0].output.finish_reasons[s]))
        if req.include_usage:
            yield sse({**head, "choices": [], "usage": usage(prompts, results)})
        yield sse("[DONE]")
    finally:
        for rid in rids:  # a client that went away leaves the batch
            server.worker.cancel(rid)


async def chat_complete(server: Server, req: ChatRequest):
    prompt = chat_prompt(req, server.tokenizer)
    limit = server.check(req, [prompt], req.limit)
    top = (req.top_logprobs or 0) if req.logprobs else 0
    queue, rids = server.submit(req, [prompt], limit, top, req.stream)
    mode = req.modes[0]
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": server.name}
    if req.stream:
        return StreamingResponse(stream_chat(server, req, prompt, queue, rids, head, mode),
                                 media_type="text/event-stream")
    finished = (await collect(queue, 1))[0]
    choices = []
    for s in range(req.n):
        text = ChoiceText(server.tokenizer, req.stop_list())
        text.ids = finished.output.tokens[s]
        message, calls = chat_message(text.text(), mode)
        choices.append({"index": s, "message": message,
                        "logprobs": chat_logprobs(server, finished, s) if req.logprobs else None,
                        "finish_reason": finish_reason(finished.output.finish_reasons[s],
                                                       calls)})
    return {**head, "choices": choices, "usage": usage([prompt], {0: finished})}


async def stream_chat(server, req, prompt, queue, rids, head, mode) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    streams = [ChatStream(server.tokenizer, req.stop_list(), mode) for _ in range(req.n)]

    def chunk(s: int, delta: dict, reason=None) -> str:
        return sse({**head, "choices": [{"index": s, "delta": delta, "logprobs": None,
                                         "finish_reason": reason}]})

    try:
        for s in range(req.n):
            yield chunk(s, {"role": "assistant", "content": ""})
        while True:
            kind, tag, *rest = await queue.get()
            if kind == "error":
                yield sse({"error": {"message": rest[0], "type": "server_error"}})
                return
            if kind == "token":
                delta = streams[rest[0]].push(rest[1])
                if delta:
                    yield chunk(rest[0], delta)
                continue
            finished = rest[0]
            for s, stream in enumerate(streams):
                if delta := stream.rest():
                    yield chunk(s, delta)
                message, calls = chat_message(stream.text.text(), mode)
                if calls:
                    yield chunk(s, {"tool_calls": [{"index": k, **c} for k, c in
                                                   enumerate(message["tool_calls"])]})
                yield chunk(s, {}, finish_reason(finished.output.finish_reasons[s], calls))
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": usage([prompt], {0: finished})})
            yield sse("[DONE]")
            return
    finally:
        for rid in rids:
            server.worker.cancel(rid)
