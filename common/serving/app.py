"""An OpenAI-compatible completions endpoint over :class:`Engine`, with per-request experts.

Routes: ``POST /v1/completions`` (``stream`` as server-sent events, as OpenAI clients expect),
``GET /v1/models``, ``GET /v1/experts`` (the slots, their orgs and license classes), ``GET
/health``. A request restricts its experts with an extra body field, which the ``openai``
client passes through ``extra_body``::

    {"model": "flexfed", "prompt": "...", "flexfed": {"exclude_orgs": ["acme"]}}

``include_orgs`` keeps only the named organisations' experts and ``licenses`` only experts of
those license classes; the public expert always stays. Every response says which experts
served it (``flexfed.experts``). A malformed request gets 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from flexfed.common.serving.generation import Engine, Sampling
from flexfed.common.serving.policy import ExpertPolicy, PolicyError


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": kind, "code": None}}
    )


def _sampling(body: dict[str, Any]) -> Sampling:
    def number(key: str, default: float, kind: type) -> Any:
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PolicyError(f'"{key}" must be a number')
        if kind is int and value != int(value):
            raise PolicyError(f'"{key}" must be an integer')
        return kind(value)

    if body.get("n", 1) != 1:
        raise PolicyError('only "n": 1 is supported')
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise PolicyError('"stop" must be a string or a list of strings')
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PolicyError('"seed" must be an integer')
    return Sampling(
        max_tokens=number("max_tokens", 16, int),
        temperature=number("temperature", 0.0, float),
        top_p=number("top_p", 1.0, float),
        seed=seed,
        stop=tuple(stop or ()),
    )


def create_app(engine: Engine, model_name: str = "flexfed") -> FastAPI:
    app = FastAPI(title="flexfed serve", version="1")
    created = int(time.time())

    @app.exception_handler(PolicyError)
    async def policy_error(request: Request, exc: PolicyError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": created, "owned_by": "flexfed"}
            ],
        }

    @app.get("/v1/experts")
    def experts() -> dict[str, Any]:
        _, default_kept = engine.plan(ExpertPolicy())
        return {
            "anchor_digest": engine.anchor_digest,
            "experts": [
                {**s.describe(), "served_by_default": s.label in default_kept} for s in engine.slots
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Any:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "the request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "the request body must be a JSON object")
        if body.get("model", model_name) != model_name:
            return _error(
                404,
                f"model {body.get('model')!r} is not served here; try {model_name!r}",
                "not_found_error",
            )
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return _error(400, '"prompt" must be a string (one prompt per request)')
        sampling = _sampling(body)
        policy = ExpertPolicy.from_request(body.get("flexfed"))
        ident = f"cmpl-{uuid.uuid4().hex}"
        if body.get("stream"):
            kept, pieces = engine.stream(prompt, sampling, policy)

            def events() -> Iterator[str]:
                for text, finish in pieces:
                    chunk = {
                        "id": ident,
                        "object": "text_completion",
                        "created": int(time.time()),
                        "model": model_name,
                        "choices": [
                            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                        ],
                        "flexfed": {"experts": list(kept)},
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        # NOTE: generation blocks; run it in the thread pool, not on the event loop.
        done = await run_in_threadpool(engine.complete, prompt, sampling, policy)
        return {
            "id": ident,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [
                {
                    "index": 0,
                    "text": done.text,
                    "logprobs": None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": done.prompt_tokens,
                "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens,
            },
            "flexfed": {"experts": list(done.experts)},
        }

    return app
