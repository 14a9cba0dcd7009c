"""The gateway's OpenAI-compatible HTTP API, as the official ``openai`` client and plain HTTP see it.

Three layers: the chat template on its own; the HTTP front in this process over a scripted stand-in for
``GatewayServicer.Generate`` (the mapping of fields, statuses, streams, disconnects and the drain, fast and
exact); and a whole stack of sim workers with API keys and a chat template, called through the front.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import jinja2
import openai
import pytest

from gateway.chat_template import ChatTemplate, ChatTemplateError
from gateway.openai_http import HttpFront
from services.rpc import common_pb2, gateway_pb2
from services.settings import GatewaySettings
from tests.helpers import cluster

# ----- helpers -------------------------------------------------------------------------------------------------
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
          "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}"
          "\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
          "{% endfor %}")
LLAMA2 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")


def checkpoint(folder, template=None, **config):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", **config}
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def raw(url, body=None, headers=None, method=None):
    """A plain HTTP call: (status, headers, body bytes), errors included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def sse_events(body: bytes) -> list[str]:
    """The data lines of an SSE body, in order."""
    text = body.decode()
    assert text.endswith("\n\n")
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


# ----- the chat template ---------------------------------------------------------------------------------------
def test_chat_template_renders_the_checkpoints_template(tmp_path):
    t = ChatTemplate.load(checkpoint(tmp_path / "zephyr", ZEPHYR))
    assert t.has_template and t.source.endswith("tokenizer_config.json")
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"


def test_chat_template_takes_off_the_bos_the_tokenizer_adds_again(tmp_path):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"}]
    t = ChatTemplate.load(checkpoint(tmp_path / "llama", LLAMA2))
    assert t.render(messages) == "[INST] Hi [/INST] Hello </s>[INST] Again [/INST]"
    kept = ChatTemplate.load(checkpoint(tmp_path / "no-bos", LLAMA2, add_bos_token=False))
    assert kept.render(messages).startswith("<s>[INST] Hi")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):      # raise_exception -> 400
        t.render([{"role": "assistant", "content": "x"}])


def test_chat_template_sources_and_fallback(tmp_path):
    named = checkpoint(tmp_path / "named", [{"name": "tool_use", "template": "T"},
                                            {"name": "default", "template": "{{ messages[0].content }}!"}])
    assert ChatTemplate.load(named).render([{"role": "user", "content": "a"}]) == "a!"
    jinja_file = checkpoint(tmp_path / "file", "IGNORED")
    (jinja_file / "chat_template.jinja").write_text("{% generation %}{{ messages | length }}{% endgeneration %}"
                                                    "{{ messages | tojson }}")
    assert ChatTemplate.load(jinja_file).render([{"role": "user", "content": "é"}]) == \
        '1[{"role": "user", "content": "é"}]'
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    for plain in (ChatTemplate.load(""), ChatTemplate.load(checkpoint(tmp_path / "base"))):
        assert not plain.has_template
        assert plain.render(messages) == "system: S\nuser: Hi\nassistant:"


def test_chat_template_is_sandboxed_and_checked_at_start(tmp_path):
    evil = ChatTemplate.load(checkpoint(tmp_path / "evil", "{{ ''.__class__.__mro__[1].__subclasses__() }}"))
    with pytest.raises(ChatTemplateError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.TemplateSyntaxError):
        ChatTemplate.load(checkpoint(tmp_path / "broken", "{% for m in messages %}"))
    with pytest.raises(ValueError, match="not a folder"):
        ChatTemplate.load(tmp_path / "missing")


# ----- the front over a scripted Generate ------------------------------------------------------------------------
class FakeGateway:
    """Stands in for ``GatewayServicer.Generate``: records each request and plays a script."""

    def __init__(self) -> None:
        self.requests: list[gateway_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []
        self.script = self.answer
        self.cancelled = asyncio.Event()

    async def __call__(self, request, context) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        self.time_remaining.append(context.time_remaining())
        try:
            await self.script(request, context)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    @staticmethod
    async def answer(request, context, words=(" one", " two", " three"), delay=0.0) -> None:
        for word in words:
            await context.write(gateway_pb2.GenerateResponse(text=word, token_ids=[7]))
            await asyncio.sleep(delay)
        await context.write(gateway_pb2.GenerateResponse(
            finish_reason="length", request_id=request.request_id,
            metrics=common_pb2.RequestMetrics(prompt_tokens=4, completion_tokens=len(words), ttft_ms=1.5,
                                              tpot_ms=0.5, e2e_ms=2.5, worker_id="w-fake")))


@pytest.fixture
async def front():
    fake = FakeGateway()
    f = HttpFront(fake, GatewaySettings(http_port=0, drain_grace_s=3))
    await f.start()
    try:
        yield f, fake
    finally:
        await f.stop()


def client(f: HttpFront, key: str = "sk-test", **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{f.url}/v1", api_key=key, max_retries=0, **kw)


async def in_thread(fn, *args, **kw):
    return await asyncio.to_thread(fn, *args, **kw)


async def test_fields_extras_and_headers_reach_the_generate_request(front):
    f, fake = front
    c = client(f)
    done = await c.completions.create(
        model="tandem", prompt=["Say three words"], max_tokens=3, temperature=0.0, top_p=0.9, seed=11,
        stop=["\n", "END"], user="someone", presence_penalty=0, n=1,
        extra_body={"slo_class": "code", "priority": 3, "ttft_ms": 250, "top_k": 5, "ignore_eos": True},
        extra_headers={"x-tandem-priority": "9", "x-tandem-tpot-ms": "40", "x-tandem-e2e-ms": "1500",
                       "x-tandem-timeout-ms": "30000",
                       "traceparent": "00-5cf92f3577b34da6a3ce929d0e0e4736-10f067aa0ba902b7-01"})
    r = fake.requests[-1]
    assert r.prompt == "Say three words" and r.max_tokens == 3 and list(r.stop) == ["\n", "END"]
    assert (r.temperature, round(r.top_p, 5), r.seed, r.top_k, r.ignore_eos) == (0.0, 0.9, 11, 5, True)
    assert (r.slo_class, r.priority) == ("code", 3)            # the body wins over x-tandem-priority
    assert (r.ttft_ms, r.tpot_ms, r.e2e_ms) == (250, 40, 1500)
    assert 25 < fake.time_remaining[-1] <= 30            # the deadline reaches the servicer
    md = fake.metadata[-1]
    assert md["authorization"] == "Bearer sk-test" and md["traceparent"].startswith("00-5cf92f")
    assert done.object == "text_completion" and done.model == "tandem" and done.id == f"cmpl-{r.request_id}"
    assert done.choices[0].text == " one two three" and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (4, 3, 7)
    assert done.model_extra["tandem"]["worker_id"] == "w-fake" and done.model_extra["tandem"]["ttft_ms"] == 1.5

    chat = await c.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "Hi"}],
                                           max_completion_tokens=5, max_tokens=99,
                                           extra_headers={"x-tandem-slo-class": "batch", "x-request-id": "my-id-1"})
    r = fake.requests[-1]
    assert r.prompt == "user: Hi\nassistant:" and r.max_tokens == 5 and r.slo_class == "batch"
    assert r.request_id == "my-id-1" and chat.id == "chatcmpl-my-id-1"
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == " one two three"
    plain = await c.completions.create(model="tandem", prompt="x")
    assert not fake.requests[-1].HasField("max_tokens") and not fake.requests[-1].HasField("temperature")
    assert plain.choices[0].text == " one two three" and fake.time_remaining[-1] is None


async def test_streams_carry_chunks_usage_and_done(front):
    f, fake = front
    c = client(f)
    stream = await c.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "Hi"}],
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == " one two three"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert finals[0].model_extra["tandem"]["worker_id"] == "w-fake"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 7

    stream = await c.completions.create(model="tandem", prompt="Hi", stream=True, echo=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(ch.choices[0].text for ch in chunks) == "Hi one two three"
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None

    status, headers, body = await in_thread(raw, f"{f.url}/v1/completions",
                                            {"model": "tandem", "prompt": "Hi", "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == [" one", " two", " three", ""]


@pytest.mark.parametrize("code,status,error,retry", [
    (grpc.StatusCode.INVALID_ARGUMENT, 400, openai.BadRequestError, None),
    (grpc.StatusCode.UNAUTHENTICATED, 401, openai.AuthenticationError, None),
    (grpc.StatusCode.PERMISSION_DENIED, 403, openai.PermissionDeniedError, None),
    (grpc.StatusCode.NOT_FOUND, 404, openai.NotFoundError, None),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, openai.RateLimitError, 1500),
    (grpc.StatusCode.UNAVAILABLE, 503, openai.InternalServerError, None),
    (grpc.StatusCode.DEADLINE_EXCEEDED, 504, openai.InternalServerError, None),
    (grpc.StatusCode.INTERNAL, 500, openai.InternalServerError, None),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_statuses_map_to_http_and_openai_errors(front, code, status, error, retry, stream):
    f, fake = front

    async def refuse(request, context):
        if retry is not None:
            context.set_trailing_metadata((("retry-after-ms", str(retry)),))
        await context.abort(code, "temperature: must be a finite number >= 0, got -1.0"
                            if code == grpc.StatusCode.INVALID_ARGUMENT else f"it went {code.name}")

    fake.script = refuse
    with pytest.raises(error) as info:
        await client(f).completions.create(model="tandem", prompt="x", stream=stream)
    e = info.value
    assert e.status_code == status and e.body["message"] and e.body["type"]
    if status == 400:
        assert e.param == "temperature" and e.type == "invalid_request_error"
    if retry is not None:
        assert e.response.headers["retry-after"] == "2" and e.response.headers["retry-after-ms"] == "1500"
        assert e.code == "rate_limit_exceeded"


async def test_refuses_what_it_cannot_honour_and_ignores_the_harmless(front):
    f, fake = front
    c = client(f)
    cases = [
        (c.completions.create, dict(prompt="x", n=2), "n"),
        (c.completions.create, dict(prompt="x", best_of=3), "best_of"),
        (c.completions.create, dict(prompt="x", logprobs=2), "logprobs"),
        (c.completions.create, dict(prompt=[1, 2, 3]), "prompt"),
        (c.completions.create, dict(prompt=["a", "b"]), "prompt"),
        (c.completions.create, dict(prompt="x", suffix="y"), "suffix"),
        (c.completions.create, dict(prompt="x", frequency_penalty=0.5), "frequency_penalty"),
        (c.completions.create, dict(prompt="x", max_tokens="ten"), "max_tokens"),
        (c.completions.create, dict(prompt="x", temperature="hot"), "temperature"),
        (c.completions.create, dict(prompt="x", extra_body={"priority": 1.5}), "priority"),
        (c.completions.create, dict(prompt="x", extra_headers={"x-tandem-ttft-ms": "soon"}), "ttft_ms"),
        (c.completions.create, dict(prompt="x", extra_body={"timeout_ms": -1}), "timeout_ms"),
        (c.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], logprobs=True), "logprobs"),
        (c.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], n=4), "n"),
        (c.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_object"}), "response_format"),
        (c.chat.completions.create, dict(messages=[{"role": "user", "content": "x"}], tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        (c.chat.completions.create, dict(messages=[]), "messages"),
        (c.chat.completions.create, dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        (c.chat.completions.create, dict(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]), "messages[0].content"),
    ]
    for create, kw, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await create(model="tandem", **kw)
        assert info.value.status_code == 400 and info.value.param == param, (kw, info.value.body)
        assert info.value.body["message"].startswith(param), info.value.body
    assert not fake.requests                    # none of them reached the gateway
    await c.chat.completions.create(model="tandem", user="u", presence_penalty=0, frequency_penalty=0.0,
                                    logprobs=False, n=1, response_format={"type": "text"}, tool_choice="none",
                                    messages=[{"role": "developer", "content": [{"type": "text", "text": "S"}]},
                                              {"role": "user", "content": "x"}])
    assert fake.requests[-1].prompt == "system: S\nuser: x\nassistant:"


async def test_bad_http_gets_openai_shaped_errors(front):
    f, _ = front
    for body, code in ((b"{not json", 400), (b"[1, 2]", 400), (b"\xff\xfe", 400)):
        status, _, out = await in_thread(raw, f"{f.url}/v1/completions", body)
        error = json.loads(out)["error"]
        assert status == code and error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    status, _, out = await in_thread(raw, f"{f.url}/v1/nothing-here")
    assert status == 404 and json.loads(out)["error"]["type"] == "not_found_error"
    status, headers, out = await in_thread(raw, f"{f.url}/v1/completions")
    assert status == 405 and "POST" in headers["allow"] and "error" in json.loads(out)
    status, _, out = await in_thread(raw, f"{f.url}/v1/completions", {"model": "tandem", "prompt": "x"},
                                     headers={"content-length": str(f.max_body_bytes + 1)})
    assert status == 413 and "limit" in json.loads(out)["error"]["message"]


async def test_models_and_unknown_models(front):
    f, fake = front
    c = client(f)
    models = await c.models.list()
    assert [m.id for m in models.data] == ["tandem"] and models.data[0].owned_by == "tandem"
    assert (await c.models.retrieve("tandem")).id == "tandem"
    with pytest.raises(openai.NotFoundError) as info:
        await c.models.retrieve("gpt-4o")
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as info:
        await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.param == "model" and not fake.requests


async def test_a_stream_that_fails_after_it_began_ends_with_an_error_event(front):
    f, fake = front

    async def fail_midway(request, context):
        await context.write(gateway_pb2.GenerateResponse(text=" partial", token_ids=[3]))
        await context.abort(grpc.StatusCode.ABORTED, "worker w0 failed after 1 tokens: UNAVAILABLE")

    fake.script = fail_midway
    seen = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in await client(f).completions.create(model="tandem", prompt="x", stream=True):
            seen.append(chunk.choices[0].text)
    assert seen == [" partial"] and "failed after 1 tokens" in info.value.message
    assert info.value.body["code"] == "aborted"
    status, _, body = await in_thread(raw, f"{f.url}/v1/chat/completions", {
        "model": "tandem", "messages": [{"role": "user", "content": "x"}], "stream": True})
    events = sse_events(body)
    assert status == 200 and "[DONE]" not in events
    assert json.loads(events[-1])["error"]["type"] == "server_error"


async def test_a_client_that_goes_away_cancels_the_request(front):
    f, fake = front
    forever = asyncio.Event()

    async def slow(request, context):
        await context.write(gateway_pb2.GenerateResponse(text=" first", token_ids=[3]))
        await forever.wait()

    fake.script = slow
    stream = await client(f).completions.create(model="tandem", prompt="x", stream=True)
    async for chunk in stream:
        assert chunk.choices[0].text == " first"
        break
    await stream.close()
    await asyncio.wait_for(fake.cancelled.wait(), 5)

    fake.cancelled.clear()

    async def silent(request, context):
        await forever.wait()

    fake.script = silent
    with pytest.raises(openai.APITimeoutError):
        await client(f, timeout=0.3).completions.create(model="tandem", prompt="x")
    await asyncio.wait_for(fake.cancelled.wait(), 5)


async def test_stop_lets_open_streams_finish_and_refuses_new_connections(front):
    f, fake = front

    async def slow(request, context):
        await FakeGateway.answer(request, context, words=[f" w{i}" for i in range(6)], delay=0.1)

    fake.script = slow
    stream = await client(f).completions.create(model="tandem", prompt="x", stream=True)
    texts = []
    stopping = None
    async for chunk in stream:
        texts.append(chunk.choices[0].text)
        if stopping is None:
            stopping = asyncio.ensure_future(f.stop())
    await asyncio.wait_for(stopping, 10)
    assert "".join(texts) == " w0 w1 w2 w3 w4 w5" and chunk.choices[0].finish_reason == "length"
    with pytest.raises(openai.APIConnectionError):
        await client(f).models.list()


async def test_api_keys_are_checked_before_anything_else():
    fake = FakeGateway()
    f = HttpFront(fake, GatewaySettings(http_port=0, api_keys={"k-alpha": "alpha"}))
    await f.start()
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await client(f, key="wrong").models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        status, _, out = await in_thread(raw, f"{f.url}/v1/completions", b"{not json")
        assert status == 401 and json.loads(out)["error"]["type"] == "authentication_error"
        assert [m.id for m in (await client(f, key="k-alpha").models.list()).data] == ["tandem"]
        status, _, _ = await in_thread(raw, f"{f.url}/v1/models", headers={"x-api-key": "k-alpha"})
        assert status == 200
    finally:
        await f.stop()


async def test_the_http_port_is_the_settings_and_a_taken_port_fails_loudly():
    fake = FakeGateway()
    first = HttpFront(fake, GatewaySettings(http_port=0))
    await first.start()
    try:
        assert first.url == f"http://127.0.0.1:{first.port}" and first.port > 0
        second = HttpFront(fake, GatewaySettings(http_port=first.port))
        with pytest.raises(SystemExit, match="cannot listen"):
            await second.start()
    finally:
        await first.stop()
    assert HttpFront(fake, GatewaySettings(host="0.0.0.0", http_port=0)).url.startswith("http://127.0.0.1:")


# ----- a whole stack of sim workers -----------------------------------------------------------------------------
KEYS = {"k-alpha": "alpha", "k-beta": "beta"}
STACK_TEMPLATE = "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|>\n{% endfor %}" \
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tandem.launcher import LocalStack

    template = checkpoint(tmp_path_factory.mktemp("ckpt"), STACK_TEMPLATE)
    s = LocalStack(cluster("A100-80G"), gateway_port=0, log_dir=tmp_path_factory.mktemp("logs"), http_port=0,
                   env={"TANDEM_API_KEYS": json.dumps(KEYS), "TANDEM_CHAT_TEMPLATE": str(template)})
    s.start()
    try:
        s.template = ChatTemplate.load(template)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def oai(stack):
    assert stack.openai_url.startswith("http://127.0.0.1:") and stack.openai_url.endswith("/v1")
    return openai.OpenAI(base_url=stack.openai_url, api_key="k-alpha", max_retries=0)


@pytest.mark.slow
def test_stack_completions_whole_and_streamed(stack, oai):
    prompt = "the quick brown fox jumps"
    whole = oai.completions.create(model="tandem", prompt=prompt, max_tokens=8, seed=5, temperature=0)
    choice = whole.choices[0]
    assert choice.text.startswith("[simulated]") and choice.finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 8, 13)
    tandem = whole.model_extra["tandem"]
    assert tandem["worker_id"] == "w0-a100-80g" and 0 < tandem["ttft_ms"] <= tandem["e2e_ms"]

    chunks = list(oai.completions.create(model="tandem", prompt=prompt, max_tokens=8, seed=5, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and len({c.id for c in chunks}) == 1

    words = choice.text.split()
    stopped = oai.completions.create(model="tandem", prompt=prompt, max_tokens=8, seed=5, stop=[f" {words[3]}"])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == " ".join(words[:3])


@pytest.mark.slow
def test_stack_chat_uses_the_checkpoints_template(stack, oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour"}]
    rendered = stack.template.render(messages)
    assert not rendered.startswith("<s>") and rendered.endswith("<|assistant|>")
    whole = oai.chat.completions.create(model="tandem", messages=messages, max_tokens=6, seed=3)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content.startswith("[simulated]") and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(rendered.split())     # the sim tokenizer: one token a word
    assert whole.usage.prompt_tokens != len(ChatTemplate().render(messages).split())

    chunks = list(oai.chat.completions.create(model="tandem", messages=messages, max_completion_tokens=6, seed=3,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_stack_models_and_plain_http_sse(stack, oai):
    assert [m.id for m in oai.models.list().data] == ["tandem"]
    status, headers, body = raw(f"{stack.openai_url}/chat/completions", {
        "model": "tandem", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
        headers={"authorization": "Bearer k-beta"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["tandem"]["request_id"]


@pytest.mark.slow
def test_stack_errors_keys_and_tandem_fields(stack, oai):
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tandem", prompt="x", temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="llama-9000", prompt="x")
    # Tandem's fields reach the gateway: its own validation answers about them
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tandem", prompt="x", extra_body={"slo_class": "platinum"})
    assert info.value.param == "slo_class" and "platinum" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model="tandem", prompt="x", extra_headers={"x-tandem-ttft-ms": "-5"})
    assert info.value.param == "ttft_ms"
    ok = oai.completions.create(model="tandem", prompt="x", max_tokens=2,
                                extra_body={"slo_class": "code", "e2e_ms": 5000, "priority": 2, "tenant": "alpha"},
                                extra_headers={"x-tandem-tpot-ms": "50"})
    assert ok.choices[0].finish_reason == "length"
    # keys: missing or unknown -> 401; a key acts only for its own tenant -> 403
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=stack.openai_url, api_key="k-nobody", max_retries=0).completions.create(
            model="tandem", prompt="x", max_tokens=2)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, _, body = raw(f"{stack.openai_url}/completions", {"model": "tandem", "prompt": "x"})
    assert status == 401 and "missing API key" in json.loads(body)["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        oai.completions.create(model="tandem", prompt="x", max_tokens=2, extra_body={"tenant": "beta"})
    assert info.value.status_code == 403 and "beta" in info.value.message
    with pytest.raises(openai.PermissionDeniedError):      # a stream refused before it began: an HTTP status
        oai.chat.completions.create(model="tandem", messages=[{"role": "user", "content": "x"}], stream=True,
                                    extra_body={"tenant": "beta"})
