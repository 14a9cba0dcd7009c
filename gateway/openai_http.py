"""The gateway's OpenAI-compatible HTTP API: Starlette under uvicorn, in the gateway's process and event loop.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent events ending with
``data: [DONE]``, or whole), ``GET /v1/models`` and ``GET /v1/models/{id}``. Each request becomes a
``GenerateRequest`` and runs through ``GatewayServicer.Generate`` by way of a ``LocalCall``, so validation,
auth, SLO classing, prediction, routing, retries and relaying are the gRPC path's own; nothing here decides
twice. What this module does itself is the mapping: OpenAI's fields to ours, the gRPC status to an HTTP status
and OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``, and chat messages to a prompt
through the checkpoint's chat template (``gateway.chat_template``).

Tandem's own request fields (``slo_class``, ``priority``, ``tenant``, the request's SLO targets ``ttft_ms``,
``tpot_ms``, ``e2e_ms``, plus ``top_k``, ``ignore_eos``, ``timeout_ms``) are read from the JSON body (the
OpenAI client's ``extra_body``) or from ``x-tandem-*`` headers; the body wins. ``x-request-id`` names the
request. The API key (``Authorization: Bearer KEY``) goes to the gateway's auth as gRPC metadata does, and
W3C ``traceparent`` headers continue the caller's trace. Parameters that would change the answer and that
Tandem cannot honour (``n`` > 1, ``best_of`` > 1, log-probabilities, penalties, logit bias, tools, JSON
response formats, token-id prompts) are refused with 400 rather than ignored; harmless ones (``user``, zero
penalties, ...) are ignored. Each response carries Tandem's timings in an extra ``tandem`` field
(on the last chunk of a stream), which OpenAI clients ignore.

An error before the first token is an HTTP error status; once a stream has begun, a failure is sent as one
SSE event in OpenAI's error shape and the stream ends without ``[DONE]``. A client that disconnects cancels
the request, which aborts it on the worker at once. ``stop()`` stops accepting connections and lets open
streams finish within the drain grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import socket
import ssl
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, TypeVar

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.auth import AuthError, authenticate
from gateway.chat_template import ROLES, ChatTemplate, ChatTemplateError
from gateway.local_call import CallFailed, LocalCall
from services.rpc import common_pb2, gateway_pb2
from services.settings import GatewaySettings

log = logging.getLogger(__name__)

Generate = Callable[[gateway_pb2.GenerateRequest, Any], Awaitable[None]]
T = TypeVar("T")

INT32 = (-2**31, 2**31 - 1)
INT64 = (-2**63, 2**63 - 1)
FORWARDED_METADATA = ("authorization", "x-api-key", "traceparent", "tracestate", "baggage")

# gRPC status -> (HTTP status, OpenAI error type)
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
CODES = {grpc.StatusCode.UNAUTHENTICATED: "invalid_api_key", grpc.StatusCode.RESOURCE_EXHAUSTED: "rate_limit_exceeded"}
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}    # "abort" as vLLM reports it
_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): ")

# Tandem's own fields: body name -> (header, kind)
TANDEM_FIELDS: dict[str, tuple[str, str]] = {
    "slo_class": ("x-tandem-slo-class", "str"),
    "priority": ("x-tandem-priority", "int32"),
    "tenant": ("x-tandem-tenant", "str"),
    "ttft_ms": ("x-tandem-ttft-ms", "float"),
    "tpot_ms": ("x-tandem-tpot-ms", "float"),
    "e2e_ms": ("x-tandem-e2e-ms", "float"),
    "timeout_ms": ("x-tandem-timeout-ms", "float"),
    "top_k": ("x-tandem-top-k", "int32"),
    "ignore_eos": ("x-tandem-ignore-eos", "bool"),
    "request_id": ("x-request-id", "str"),
}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with its HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    @classmethod
    def from_call(cls, e: CallFailed) -> "ApiError":
        """The status a gRPC client would have seen, as HTTP."""
        status, kind = STATUS.get(e.code, (500, "server_error"))
        param = None
        if status == 400 and (m := _FIELD.match(e.details or "")):
            param = m.group(1)
        headers = {}
        if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and (ms := e.retry_after_ms) is not None:
            headers = {"retry-after": str(max(1, math.ceil(ms / 1000))), "retry-after-ms": str(ms)}
        return cls(status, e.details or e.code.name, type=kind, param=param,
                   code=CODES.get(e.code, e.code.name.lower()), headers=headers)


def invalid(param: str, problem: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param=param, code=code)


# ----- reading the request -------------------------------------------------------------------------------------
class Params:
    """The JSON body with typed getters (400 naming the field on a wrong type), and header fall-backs."""

    def __init__(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        self.body, self.headers = body, headers

    def get(self, name: str, kind: str, header: str | None = None) -> Any:
        value = self.body.get(name)
        if value is None and header is not None and (raw := self.headers.get(header)) is not None:
            return self._from_header(name, header, raw.strip(), kind)
        return None if value is None else self._check(name, value, kind)

    def _check(self, name: str, value: Any, kind: str) -> Any:
        if kind == "str":
            if not isinstance(value, str):
                raise invalid(name, f"must be a string, got {type(value).__name__}")
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise invalid(name, f"must be a boolean, got {type(value).__name__}")
            return value
        if kind in ("int32", "int64"):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid(name, f"must be an integer, got {json.dumps(value)[:40]}")
            low, high = INT32 if kind == "int32" else INT64
            if not low <= value <= high:
                raise invalid(name, f"{value} is out of range")
            return value
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise invalid(name, f"must be a number, got {json.dumps(value)[:40]}")
            return float(value)
        raise AssertionError(kind)

    def _from_header(self, name: str, header: str, raw: str, kind: str) -> Any:
        try:
            if kind == "str":
                return raw
            if kind == "bool":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(raw)
                return raw.lower() in ("true", "1")
            if kind == "float":
                return float(raw)
            return self._check(name, int(raw), kind)
        except ValueError:
            raise invalid(name, f"header {header}: cannot read {raw[:40]!r} as {kind.rstrip('0123456789')}") from None


def _refuse_unsupported(p: Params, chat: bool) -> None:
    """400 for what would change the answer and cannot be honoured; harmless fields pass."""
    for name in ("n", "best_of"):
        if (value := p.get(name, "int32")) is not None and value != 1:
            raise invalid(name, f"only 1 is supported, got {value}", "unsupported_value")
    if chat:
        if p.get("logprobs", "bool"):
            raise invalid("logprobs", "log-probabilities are not supported", "unsupported_parameter")
        if p.get("top_logprobs", "int32"):
            raise invalid("top_logprobs", "log-probabilities are not supported", "unsupported_parameter")
        if p.body.get("tools") or p.body.get("functions"):
            name = "tools" if p.body.get("tools") else "functions"
            raise invalid(name, "tool calling is not supported", "unsupported_parameter")
        choice = p.body.get("tool_choice")
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "tool calling is not supported", "unsupported_parameter")
        fmt = p.body.get("response_format")
        if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
            raise invalid("response_format", "only {\"type\": \"text\"} is supported", "unsupported_value")
    else:
        if p.body.get("logprobs") is not None:
            raise invalid("logprobs", "log-probabilities are not supported", "unsupported_parameter")
        if p.get("suffix", "str"):
            raise invalid("suffix", "suffixes (insertion) are not supported", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if p.get(name, "float"):
            raise invalid(name, "penalties are not supported (0 or null only)", "unsupported_value")
    if p.body.get("logit_bias"):
        raise invalid("logit_bias", "logit bias is not supported", "unsupported_parameter")


def _prompt(p: Params) -> str:
    prompt = p.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) or isinstance(x, list) for x in prompt):
        raise invalid("prompt", "token-id prompts are not supported; send text", "unsupported_value")
    if isinstance(prompt, list) and len(prompt) > 1:
        raise invalid("prompt", f"one prompt a request is supported, got {len(prompt)}", "unsupported_value")
    raise invalid("prompt", "must be a string (or a list of one string)")


def _messages(p: Params) -> list[dict[str, Any]]:
    messages = p.body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping):
            raise invalid(where, "must be an object with a role and content")
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):              # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise invalid(f"{where}.content", f"only text parts are supported, got {kind!r}",
                                  "unsupported_value")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            if role != "assistant":
                raise invalid(f"{where}.content", "is required")
            content = ""
        elif not isinstance(content, str):
            raise invalid(f"{where}.content", "must be a string or a list of text parts")
        # OpenAI's newer name for the system prompt; checkpoints' templates know only "system"
        message = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def _stop(p: Params) -> list[str]:
    stop = p.body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise invalid("stop", "must be a string or a list of strings")


# ----- the front -----------------------------------------------------------------------------------------------
class _Server(uvicorn.Server):
    """uvicorn without signal handlers of its own: the gateway's ServiceHost owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:      # uvicorn before 0.29
        pass


class HttpFront:
    """The OpenAI-compatible API of one gateway; ``generate`` is ``GatewayServicer.Generate``."""

    def __init__(self, generate: Generate, cfg: GatewaySettings) -> None:
        self.generate = generate
        self.cfg = cfg
        self.model = cfg.served_model
        self.chat_template = ChatTemplate.load(cfg.chat_template)
        self.max_body_bytes = 4 * cfg.max_prompt_bytes + (1 << 20)
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
        ], exception_handlers={HTTPException: self._http_exception, ApiError: self._api_error,
                               Exception: self._unexpected})
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self.port = 0
        if self.chat_template.has_template:
            log.info("chat template", extra={"fields": {"source": self.chat_template.source}})

    # ----- lifecycle ---------------------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        return "https" if self.cfg.tls_cert and self.cfg.tls_key else "http"

    @property
    def url(self) -> str:
        """Where clients reach it ("http://host:port"); a wildcard host shows as loopback."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.cfg.host, self.cfg.host)
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Listen on ``cfg.host:cfg.http_port`` (0 picks a free port) and serve in this event loop."""
        self._socket = sock = self._bind()
        self.port = sock.getsockname()[1]
        kw: dict[str, Any] = {}
        if self.scheme == "https":
            kw.update(ssl_certfile=self.cfg.tls_cert, ssl_keyfile=self.cfg.tls_key)
            if self.cfg.tls_ca and self.cfg.tls_client_auth:
                kw.update(ssl_ca_certs=self.cfg.tls_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(self.app, host=self.cfg.host, port=self.port, lifespan="off", log_config=None,
                                access_log=False, ws="none", server_header=False,
                                timeout_graceful_shutdown=self.cfg.drain_grace_s, **kw)   # type: ignore[arg-type]
        self._server = server = _Server(config)
        self._task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started:
            if self._task.done():
                error = self._task.exception() if not self._task.cancelled() else None
                raise SystemExit(f"gateway: the HTTP API could not start on {self.cfg.host}:{self.port}: {error!r}")
            await asyncio.sleep(0.01)

    def _bind(self) -> socket.socket:
        host, port = self.cfg.host, self.cfg.http_port
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT only; no port sharing
            try:
                sock.bind(address)
            except OSError:
                sock.close()
                raise
        except OSError as e:
            raise SystemExit(f"gateway: cannot listen for HTTP on {host}:{port}: {e}") from None
        return sock

    async def stop(self) -> None:
        """Stop accepting; open requests and streams may finish within the drain grace, then are cancelled."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), self.cfg.drain_grace_s + 5)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
        except Exception:
            log.exception("HTTP API stopped with an error")
        finally:
            if self._socket is not None:
                self._socket.close()

    # ----- endpoints ---------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model"]
        if name != self.model:
            raise self._unknown_model(name)
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        p = await self._params(request)
        _refuse_unsupported(p, chat=False)
        prompt = _prompt(p)
        echo = bool(p.get("echo", "bool"))
        generate_request, timeout_s = self._generate_request(p, prompt, p.get("max_tokens", "int32"))
        return await self._serve(request, p, generate_request, timeout_s, chat=False, echo=prompt if echo else "")

    async def chat_completions(self, request: Request) -> Response:
        p = await self._params(request)
        _refuse_unsupported(p, chat=True)
        messages = _messages(p)
        try:
            prompt = self.chat_template.render(messages)
        except ChatTemplateError as e:
            raise invalid("messages", str(e)) from None
        max_tokens = p.get("max_completion_tokens", "int32")
        if max_tokens is None:
            max_tokens = p.get("max_tokens", "int32")
        generate_request, timeout_s = self._generate_request(p, prompt, max_tokens)
        return await self._serve(request, p, generate_request, timeout_s, chat=True)

    # ----- the mapping -------------------------------------------------------------------------------------
    async def _params(self, request: Request) -> Params:
        self._authorize(request)            # the key first, as OpenAI does; the tenant is checked on the way
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"the request body is {length} bytes, over the {self.max_body_bytes}-byte limit")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise ApiError(413, f"the request body is over the {self.max_body_bytes}-byte limit")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(499, "the client went away", type="cancelled") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        p = Params(body, request.headers)
        model = p.get("model", "str")
        if model is not None and model != self.model:
            raise self._unknown_model(model)
        return p

    def _generate_request(self, p: Params, prompt: str, max_tokens: int | None
                          ) -> tuple[gateway_pb2.GenerateRequest, float | None]:
        r = gateway_pb2.GenerateRequest(prompt=prompt, stop=_stop(p))
        for name, kind in (("temperature", "float"), ("top_p", "float"), ("seed", "int64")):
            if (value := p.get(name, kind)) is not None:
                setattr(r, name, value)
        if max_tokens is not None:
            r.max_tokens = max_tokens
        extras = {name: p.get(name, kind, header) for name, (header, kind) in TANDEM_FIELDS.items()}
        timeout_ms = extras.pop("timeout_ms")
        if timeout_ms is not None and not (math.isfinite(timeout_ms) and timeout_ms > 0):
            raise invalid("timeout_ms", f"must be a positive number of milliseconds, got {timeout_ms}")
        for name, value in extras.items():
            if value is not None:
                setattr(r, name, value)
        if not r.request_id:
            r.request_id = uuid.uuid4().hex
        return r, None if timeout_ms is None else timeout_ms / 1000

    async def _serve(self, request: Request, p: Params, generate_request: gateway_pb2.GenerateRequest,
                     timeout_s: float | None, *, chat: bool, echo: str = "") -> Response:
        metadata = [(k, v) for k in FORWARDED_METADATA if (v := request.headers.get(k)) is not None]
        call = LocalCall(metadata=metadata, timeout_s=timeout_s).start(self.generate, generate_request)
        replies = call.__aiter__()
        answer = _Answer(self.model, generate_request.request_id, chat)
        headers = {"x-request-id": generate_request.request_id}
        try:
            if p.get("stream", "bool"):
                options = p.body.get("stream_options")
                usage = isinstance(options, Mapping) and options.get("include_usage") is True
                first = await _unless_disconnected(request, _first(replies))   # errors so far: an HTTP status
                return StreamingResponse(answer.stream(call, replies, first, usage, echo), headers={
                    **headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
                    media_type="text/event-stream")
            final = await _unless_disconnected(request, answer.collect(replies))
            return JSONResponse(answer.body(final, echo), headers=headers)
        except CallFailed as e:
            raise ApiError.from_call(e) from None
        except BaseException:
            call.cancel()
            raise

    def _authorize(self, request: Request) -> None:
        try:
            authenticate([(k, v) for k, v in request.headers.items()], self.cfg.api_keys, "")
        except AuthError as e:
            status, kind = (401, "authentication_error") if e.code == "unauthenticated" else (403, "permission_error")
            raise ApiError(status, str(e), type=kind, code="invalid_api_key" if status == 401 else e.code) from None

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "tandem"}

    def _unknown_model(self, name: str) -> ApiError:
        return ApiError(404, f"The model {name!r} does not exist; this gateway serves {self.model!r}",
                        param="model", code="model_not_found")

    # ----- errors ------------------------------------------------------------------------------------------
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind,
                        code=str(exc.detail).lower().replace(" ", "_"), headers=exc.headers).response()

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        log.error("HTTP API request failed", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal").response()


async def _first(replies: AsyncIterator[gateway_pb2.GenerateResponse]) -> gateway_pb2.GenerateResponse | None:
    try:
        return await replies.__anext__()
    except StopAsyncIteration:
        return None


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result; if the client disconnects first, ``work`` is cancelled (and the call with it)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ApiError(499, "the client went away", type="cancelled")


class _Answer:
    """One request's OpenAI response: the whole body, or its stream of chunks."""

    def __init__(self, model: str, request_id: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.request_id = request_id

    async def collect(self, replies: AsyncIterator[gateway_pb2.GenerateResponse]) -> gateway_pb2.GenerateResponse:
        """All replies as one: the text joined, the final message's reason and metrics."""
        text, final = [], gateway_pb2.GenerateResponse()
        async for reply in replies:
            text.append(reply.text)
            if reply.finish_reason:
                final = reply
        final.text = "".join(text)
        return final

    def body(self, final: gateway_pb2.GenerateResponse, echo: str = "") -> dict[str, Any]:
        reason = _finish_reason(final.finish_reason or "stop")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": echo + final.text, "logprobs": None, "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None, "choices": [choice],
                "usage": _usage(final.metrics), "tandem": self._tandem(final)}

    async def stream(self, call: LocalCall, replies: AsyncIterator[gateway_pb2.GenerateResponse],
                     first: gateway_pb2.GenerateResponse | None, include_usage: bool, echo: str) -> AsyncIterator[str]:
        try:
            if self.chat:
                yield self._chunk({"role": "assistant", "content": ""}, None)
            elif echo:
                yield self._chunk(echo, None)
            reply = first
            while reply is not None:
                if reply.finish_reason:
                    yield self._chunk(reply.text, _finish_reason(reply.finish_reason), tandem=self._tandem(reply))
                    if include_usage:
                        yield _sse({"id": self.id, "object": self._object, "created": self.created,
                                    "model": self.model, "choices": [], "usage": _usage(reply.metrics)})
                    yield "data: [DONE]\n\n"
                    return
                if reply.text:
                    yield self._chunk(reply.text, None)
                reply = await _first(replies)
            raise CallFailed(grpc.StatusCode.INTERNAL, "the stream ended without a final message")
        except CallFailed as e:
            log.info("stream failed after it began", extra={"fields": {"request_id": self.request_id,
                                                                       "code": e.code.name}})
            yield _sse(ApiError.from_call(e).body())
        except Exception:
            log.exception("stream failed", extra={"fields": {"request_id": self.request_id}})
            yield _sse(ApiError(500, "internal error", type="server_error", code="internal").body())
        finally:
            call.cancel()

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, content: str | dict[str, Any], finish_reason: str | None, **extra: Any) -> str:
        if self.chat:
            delta = content if isinstance(content, dict) else ({"content": content} if content else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        return _sse({"id": self.id, "object": self._object, "created": self.created, "model": self.model,
                     "system_fingerprint": None, "choices": [choice], **extra})

    def _tandem(self, final: gateway_pb2.GenerateResponse) -> dict[str, Any]:
        m = final.metrics
        return {"request_id": final.request_id or self.request_id, "worker_id": m.worker_id,
                "ttft_ms": round(m.ttft_ms, 3), "tpot_ms": round(m.tpot_ms, 3), "e2e_ms": round(m.e2e_ms, 3),
                "queue_ms": round(m.queue_ms, 3), "preemptions": m.preemptions,
                "finish_reason": final.finish_reason}


def _finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, reason)


def _usage(m: common_pb2.RequestMetrics) -> dict[str, int]:
    return {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.completion_tokens,
            "total_tokens": m.prompt_tokens + m.completion_tokens}


def _sse(payload: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
