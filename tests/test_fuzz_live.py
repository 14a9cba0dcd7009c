"""Random public requests against one live stack: every answer is a served stream or a clean refusal.

Hypothesis draws batches of ``gateway_pb2.GenerateRequest`` messages (huge, empty and whitespace prompts, odd
Unicode planes, NaN / infinite / negative sampling and SLO numbers, int32 and int64 extremes, too many or odd
stop strings, unknown classes, over-long request ids, random tenants and replay truths) and fires each batch
concurrently at the gateway of a stack of separate processes. What an operator would check:

- every call ends, within a deadline, as OK with exactly one final message (its finish reason, its token count
  matching the tokens streamed, never more than ``max_tokens``), or INVALID_ARGUMENT naming a field the request
  really gets wrong, or RESOURCE_EXHAUSTED with a retry hint (shed or refused under load, valid requests only);
- nothing else. Not OUT_OF_RANGE: DESIGN.md's error table gives every bad request INVALID_ARGUMENT with the
  field named, and gRPC keeps OUT_OF_RANGE for a range that may change with the system's state (reading past
  the end of a file that may grow), while every limit here (a context window, int32 bounds, the prompt limit)
  is fixed for the request as sent. Not UNKNOWN or INTERNAL (an unhandled exception), not DEADLINE_EXCEEDED
  (a hang), not UNAVAILABLE (the stack is healthy, so a valid request must find a worker);
- afterwards every process is alive and logged no traceback, a good request is served, and the stack is idle
  again: no request running, waiting or holding KV blocks on any worker, none outstanding at the balancer.

The prompt limit is lowered (``TANDEM_MAX_PROMPT_BYTES``, read by the gateway's settings; the other services
ignore it) so over-limit prompts are cheap to send; one prompt over gRPC's 16 MiB message limit is sent too.
The workers' simulated steps run at 1/100 of real time so that 10,000 requests fit in about a minute.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from services.cluster import ClusterSpec, WorkerSpec
from services.rpc import balancer_pb2, balancer_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tandem.launcher import LocalStack
from tests.helpers import wait_until, worker_stats

pytestmark = pytest.mark.slow

PROMPT_LIMIT = 4096                   # bytes, the gateway's max_prompt_bytes in this stack
MAX_STOP_STRINGS = 8                  # the gateway's default
KNOWN_CLASSES = {"interactive", "code", "batch"}
DEFAULT_MAX_TOKENS = 256
BATCH = 40                            # requests per Hypothesis example (a draw of a few KB)
EXAMPLES = 250                        # BATCH * EXAMPLES >= 10,000
IN_FLIGHT = 4                         # batches sent and not yet checked: ~160 calls open while the next is drawn
CALL_TIMEOUT_S = 30.0                 # a call still open after this is a hang


# ----- the stack --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    replies: list[gateway_pb2.GenerateResponse]
    trailing: dict[str, str]


async def call(stub: gateway_pb2_grpc.GatewayStub, request: gateway_pb2.GenerateRequest) -> Outcome:
    replies: list[gateway_pb2.GenerateResponse] = []
    try:
        async for reply in stub.Generate(request, timeout=CALL_TIMEOUT_S):
            replies.append(reply)
        return Outcome(grpc.StatusCode.OK, "", replies, {})
    except grpc.aio.AioRpcError as e:
        return Outcome(e.code(), e.details() or "", replies, {k: v for k, v in (e.trailing_metadata() or ())})


class Live:
    """One stack and one client channel on an event loop of its own thread, so batches go out while
    Hypothesis draws the next ones."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.max_model_len = min(s.max_model_len for s in worker_stats(stack).values())
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-client", daemon=True)
        self.thread.start()

        async def open_channel() -> gateway_pb2_grpc.GatewayStub:   # an aio channel belongs to its loop
            self.channel = grpc.aio.insecure_channel(stack.gateway_address)
            return gateway_pb2_grpc.GatewayStub(self.channel)

        self.stub = self.send_coroutine(open_channel()).result()

    def send_coroutine(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def send(self, batch: list[gateway_pb2.GenerateRequest]) -> concurrent.futures.Future:
        async def together() -> list[Outcome]:
            return await asyncio.gather(*(call(self.stub, r) for r in batch))

        return self.send_coroutine(together())

    def fire(self, batch: list[gateway_pb2.GenerateRequest]) -> list[Outcome]:
        return self.send(batch).result(timeout=CALL_TIMEOUT_S + 10)

    def close(self) -> None:
        self.send_coroutine(self.channel.close()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    spec = ClusterSpec(workers=[WorkerSpec(id="fz-a100", gpu_type="A100-80G", time_scale=0.01),
                                WorkerSpec(id="fz-l40s", gpu_type="L40S", time_scale=0.01)])
    stack = LocalStack(spec, gateway_port=0, log_dir=tmp_path_factory.mktemp("fuzz-logs"),
                       env={"TANDEM_MAX_PROMPT_BYTES": str(PROMPT_LIMIT)}).start()
    try:
        client = Live(stack)
        try:
            yield client
        finally:
            client.close()
    finally:
        stack.stop()


# ----- what Hypothesis sends --------------------------------------------------------------------------
# Each request starts valid but odd (Unicode from every plane, extreme priorities and seeds, tiny or huge SLO
# targets, stop strings that fire at once) and then has no, one, a few or all of its fields drawn from
# anything at all, so the mix holds many served answers, refusals that must name one field, and pile-ups.
# Protobuf strings are UTF-8: lone surrogates cannot be sent at all (the client library refuses them).
ANY_CHAR = st.characters(blacklist_categories=("Cs",))
ODD_PLANES = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, blacklist_categories=("Cs",))
WHITESPACE = st.sampled_from(" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2007\u2028\u2029\u202f\u205f\u3000")
INT32 = st.integers(-2**31, 2**31 - 1)
INT64 = st.integers(-2**63, 2**63 - 1)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)        # beyond float32 too: stored as inf


def repeated(units: list[str], counts: st.SearchStrategy[int]) -> st.SearchStrategy[str]:
    """Long strings without long draws: a unit repeated."""
    return st.builds(lambda unit, n: unit * n, st.sampled_from(units), counts)


def around_limit(unit: str) -> st.SearchStrategy[str]:
    """``unit`` repeated to land just under, at or just over the prompt limit in UTF-8 bytes."""
    n = PROMPT_LIMIT // len(unit.encode())
    return st.integers(n - 2, n + 2).map(lambda k: unit * k)


GOOD = {
    "prompt": st.one_of(st.text(ANY_CHAR, min_size=1, max_size=30).filter(lambda s: not s.isspace()),
                        st.text(ODD_PLANES, min_size=1, max_size=12),
                        repeated(["w ", "\u20ac ", "\U0001f600 ", "\x00 "], st.integers(1, 400)),
                        st.just("x" * PROMPT_LIMIT)),
    # mostly short answers, so 10,000 requests fit the time budget; unset means the default of 256
    "max_tokens": st.tuples(st.integers(0, 99), st.integers(1, 40)).map(
        lambda kn: None if kn[0] == 99 else kn[1] if kn[0] >= 90 else 1 + kn[1] % 3),
    "temperature": st.one_of(st.none(), st.sampled_from([0.0, -0.0, 1e-45, 3.4e38]), st.floats(0, 5, width=32)),
    "top_p": st.one_of(st.none(), st.sampled_from([1.0, 1e-45]), st.floats(0, 1, width=32, exclude_min=True)),
    "top_k": st.one_of(st.just(0), st.integers(0, 50), st.just(2**31 - 1)),
    "seed": st.one_of(st.none(), INT64),
    "stop": st.one_of(st.just([]), st.lists(st.one_of(st.text(ANY_CHAR, max_size=4), st.sampled_from(
        ["", " ", "lorem", " ipsum", "\x00", "\U0001f600", "[simulated]"])), max_size=MAX_STOP_STRINGS)),
    "slo_class": st.sampled_from(["", *sorted(KNOWN_CLASSES)]),
    "priority": st.one_of(st.just(0), st.integers(-3, 3), st.sampled_from([-2**31, 2**31 - 1])),
    "tenant": st.one_of(st.just(""), st.integers(0, 3).map("t{}".format), st.text(ANY_CHAR, max_size=12),
                        repeated(["\U0001f600"], st.integers(100, 1000))),
    "request_id": st.one_of(st.just(""), st.just(""), st.text(ANY_CHAR, min_size=1, max_size=12),
                            repeated(["r", "\U0010fffd"], st.integers(100, 128))),
    "ignore_eos": st.booleans(),
    "ttft_ms": st.one_of(st.none(), st.just(0.0), st.floats(1e-300, 1e300)),
    "tpot_ms": st.one_of(st.none(), st.just(0.0), st.floats(1e-300, 1e300)),
    "e2e_ms": st.one_of(st.none(), st.just(0.0), st.floats(1e-300, 1e300)),
    "replay_truth": st.one_of(st.none(), st.none(), st.none(), st.integers(1, 3)),
}
WILD = {
    "prompt": st.one_of(st.just(""), st.text(WHITESPACE, min_size=1, max_size=12),
                        *(around_limit(unit) for unit in
                          ["x", "w ", "\u00e9", "\u20ac", "\U0001f600", "\U0010fffd", "\x00"]),
                        repeated(["y", "z "], st.integers(PROMPT_LIMIT + 1, 256 * 1024))),
    "max_tokens": st.one_of(st.integers(-2**31, 0), st.integers(4096 - 8, 2**31 - 1),
                            st.sampled_from([0, -1, 4095, 4096, 4097, 2**31 - 1, -2**31])),
    "temperature": ANY_FLOAT,
    "top_p": ANY_FLOAT,
    "top_k": INT32,
    "seed": INT64,
    "stop": st.lists(st.text(ANY_CHAR, max_size=3), min_size=MAX_STOP_STRINGS - 1, max_size=MAX_STOP_STRINGS + 4),
    "slo_class": st.one_of(st.text(ANY_CHAR, max_size=10), st.sampled_from(["Interactive", "batch ", "default"])),
    "priority": INT32,
    "tenant": st.text(ANY_CHAR, max_size=20),
    "request_id": st.one_of(repeated(["r", "\u00e9", "\U0010fffd"], st.integers(126, 131)),
                            repeated(["q"], st.integers(129, 100_000))),
    "ignore_eos": st.booleans(),
    "ttft_ms": ANY_FLOAT,
    "tpot_ms": ANY_FLOAT,
    "e2e_ms": ANY_FLOAT,
    "replay_truth": st.one_of(st.integers(-2**31, 0), INT32),
}
FIELDS = sorted(GOOD)
FREE = {"seed", "priority", "tenant", "ignore_eos", "replay_truth"}     # no value of these is refused: always wild
CHECKED = sorted(set(FIELDS) - FREE)
ANY_OF = {name: st.one_of(GOOD[name], WILD[name]) for name in FREE}
ONE_FIELD = st.sets(st.sampled_from(CHECKED), min_size=1, max_size=1)
SOME_FIELDS = st.sets(st.sampled_from(CHECKED), min_size=2, max_size=4)
WILD_FIELDS = st.one_of(st.just(frozenset()), ONE_FIELD, ONE_FIELD, ONE_FIELD, SOME_FIELDS,
                        st.just(frozenset(CHECKED)))     # about a third of the requests come out valid


@st.composite
def requests(draw) -> gateway_pb2.GenerateRequest:
    wild = draw(WILD_FIELDS)
    values = {name: draw(WILD[name] if name in wild else GOOD[name]) for name in CHECKED}
    values.update({name: draw(ANY_OF[name]) for name in FREE})
    truth = values.pop("replay_truth")
    r = gateway_pb2.GenerateRequest(**values)
    if truth is not None:        # benchmark-only, but anyone can send it
        r.replay_truth.output_tokens = truth
    return r


def unique_ids(batch: list[gateway_pb2.GenerateRequest], tag: int) -> list[gateway_pb2.GenerateRequest]:
    """Client ids that are allowed (1..128 characters) made unique among the requests in flight together: two
    clients sharing an id at once is its own test (``test_concurrent_duplicate_request_ids``)."""
    for i, r in enumerate(batch):
        if 0 < len(r.request_id) <= 128:
            suffix = f".{tag}.{i}"
            r.request_id = r.request_id[:128 - len(suffix)] + suffix
    return batch


# ----- what the answers must be -----------------------------------------------------------------------
def bad_fields(r: gateway_pb2.GenerateRequest) -> set[str]:
    """The fields the gateway must refuse, from the API's documented rules (values as they arrive: float
    fields are float32 on the wire)."""
    bad = set()
    if not r.prompt or r.prompt.isspace() or len(r.prompt.encode()) > PROMPT_LIMIT:
        bad.add("prompt")
    if r.HasField("max_tokens") and r.max_tokens <= 0:
        bad.add("max_tokens")
    if r.HasField("temperature") and not (math.isfinite(r.temperature) and r.temperature >= 0):
        bad.add("temperature")
    if r.HasField("top_p") and not 0 < r.top_p <= 1:            # NaN fails the comparison too
        bad.add("top_p")
    if r.top_k < 0:
        bad.add("top_k")
    if len(r.stop) > MAX_STOP_STRINGS:
        bad.add("stop")
    if r.slo_class and r.slo_class not in KNOWN_CLASSES:
        bad.add("slo_class")
    if len(r.request_id) > 128:
        bad.add("request_id")
    for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
        value = getattr(r, name)
        if r.HasField(name) and not (math.isfinite(value) and value >= 0):
            bad.add(name)
    return bad


def too_long_for_model(r: gateway_pb2.GenerateRequest, max_model_len: int) -> set[str]:
    """What only a worker can tell: the prompt's tokens (the sim tokenizer: one a word) plus max_tokens against
    the context window."""
    prompt_tokens = len(r.prompt.split())
    max_tokens = r.max_tokens if r.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if prompt_tokens >= max_model_len:
        return {"prompt"}
    if max_tokens > max_model_len or prompt_tokens + max_tokens > max_model_len:
        return {"max_tokens", "prompt"}
    return set()


def problem(r: gateway_pb2.GenerateRequest, o: Outcome, max_model_len: int) -> str | None:
    """Why this answer is wrong for this request, or None."""
    if "Traceback" in o.details:
        return "a traceback in the status details"
    expected_bad = bad_fields(r) or too_long_for_model(r, max_model_len)
    if expected_bad:
        if o.code != grpc.StatusCode.INVALID_ARGUMENT:
            return f"expected INVALID_ARGUMENT naming one of {sorted(expected_bad)}, got {o.code.name} {o.details!r}"
        named = o.details.split(":", 1)[0]
        if named not in expected_bad:
            return f"INVALID_ARGUMENT names {named!r}, expected one of {sorted(expected_bad)}: {o.details!r}"
        return None
    if o.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None if "retry-after-ms" in o.trailing else f"RESOURCE_EXHAUSTED without a retry hint: {o.details!r}"
    if o.code != grpc.StatusCode.OK:
        return f"a valid request got {o.code.name} {o.details!r}"
    if not o.replies or not o.replies[-1].finish_reason:
        return "the stream ended without a final message"
    if any(reply.finish_reason for reply in o.replies[:-1]):
        return "a message after the final one"
    final = o.replies[-1]
    if final.finish_reason not in ("stop", "length"):
        return f"finish_reason {final.finish_reason!r}"
    tokens = sum(len(reply.token_ids) for reply in o.replies)
    cap = r.max_tokens if r.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if final.metrics.completion_tokens != tokens or tokens > cap:
        return f"{tokens} tokens streamed, final says {final.metrics.completion_tokens}, max_tokens {cap}"
    if final.finish_reason == "length" and tokens != cap:
        return f"finish_reason length after {tokens} of {cap} tokens"
    if r.request_id and final.request_id != r.request_id:
        return f"request_id {final.request_id!r} in place of the client's {r.request_id!r}"
    return None


def listing(balancer_address: str) -> balancer_pb2.ListWorkersResponse:
    with grpc.insecure_channel(balancer_address) as channel:
        return balancer_pb2_grpc.BalancerStub(channel).ListWorkers(balancer_pb2.ListWorkersRequest(), timeout=5)


def service_tracebacks(stack: LocalStack) -> dict[str, str]:
    return {name: p.log_tail(40) for name, p in stack.processes.items()
            if "Traceback" in p.stderr_path.read_text(errors="replace")}


# ----- the tests --------------------------------------------------------------------------------------
def test_ten_thousand_random_requests_get_clean_answers(live):
    """The property, over 10,000 drawn requests: each answer is right for its request (``problem``). Batches
    are sent as they are drawn and checked a few batches later, so a wrong answer is reported with its own
    request (below) rather than as Hypothesis's falsifying example; no shrinking against a live stack."""
    counts: Counter[str] = Counter()
    wrong: list[tuple[gateway_pb2.GenerateRequest, Outcome, str]] = []
    pending: deque[tuple[list[gateway_pb2.GenerateRequest], concurrent.futures.Future]] = deque()
    tags = iter(range(10**9))

    def check(batch: list[gateway_pb2.GenerateRequest], sent: concurrent.futures.Future) -> None:
        outcomes = sent.result(timeout=CALL_TIMEOUT_S + 10)
        counts.update(o.code.name for o in outcomes)
        wrong.extend((r, o, why) for r, o in zip(batch, outcomes) if (why := problem(r, o, live.max_model_len)))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=False,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(requests(), min_size=BATCH, max_size=BATCH))
    def send_batch(batch):
        if len(wrong) > 20:          # broken already: stop loading the stack, report below
            return
        batch = unique_ids(batch, next(tags))
        pending.append((batch, live.send(batch)))
        while len(pending) > IN_FLIGHT or (pending and pending[0][1].done()):
            check(*pending.popleft())

    started = time.monotonic()
    send_batch()
    while pending:
        check(*pending.popleft())
    took = time.monotonic() - started
    print(f"\n{sum(counts.values())} random requests in {took:.1f} s: {dict(counts)}")
    if wrong:
        pytest.fail(f"{len(wrong)} answers wrong; the first ones:\n" + "\n".join(
            f"- {why}\n  request: {short(r)}" for r, o, why in wrong[:8]), pytrace=False)
    assert sum(counts.values()) >= 10_000
    assert counts["OK"] >= 2000 and counts["INVALID_ARGUMENT"] >= 2000      # both sides were exercised

    # one message over gRPC's own 16 MiB limit: refused by the transport, the gateway unharmed
    huge = live.fire([gateway_pb2.GenerateRequest(prompt="z" * (17 * 1024 * 1024), max_tokens=1)])[0]
    assert huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED, (huge.code, huge.details)

    stack = live.stack
    assert {name: p.popen.poll() for name, p in stack.processes.items()} == {name: None for name in stack.processes}
    good = live.fire([gateway_pb2.GenerateRequest(prompt="after the storm", max_tokens=4, request_id="calm")])[0]
    assert good.code == grpc.StatusCode.OK and good.replies[-1].finish_reason == "length", good
    assert good.replies[-1].metrics.completion_tokens == 4 and good.replies[-1].request_id == "calm"

    def idle() -> bool:
        listed, stats = listing(stack.balancer_address), worker_stats(stack)
        return (len(stats) == len(stack.cluster.workers) and len(listed.workers) == len(stats)
                and listed.queue_length == 0 and all(w.outstanding == 0 for w in listed.workers)
                and all(s.running == s.waiting == s.kv_blocks_used == s.open_streams == 0 for s in stats.values()))

    try:
        wait_until(idle, 10, 0.1)
    except AssertionError:
        pytest.fail(f"not idle after the storm: workers {worker_stats(stack)}\nbalancer "
                    f"{listing(stack.balancer_address)}", pytrace=False)
    assert not service_tracebacks(stack)


def short(r: gateway_pb2.GenerateRequest) -> str:
    """A request for a failure report, long strings cut."""
    def cut(text: str) -> str:
        return text if len(text) <= 80 else f"{text[:40]}...({len(text)} chars, {len(text.encode())} bytes)"

    shown = gateway_pb2.GenerateRequest()
    shown.CopyFrom(r)
    shown.prompt, shown.request_id, shown.tenant = cut(r.prompt), cut(r.request_id), cut(r.tenant)
    return repr(str(shown))[:2000]


def test_concurrent_duplicate_request_ids(live):
    """Clients choose their own request ids, so two of them (two tenants here) may send the same one at once.
    Each must be served on its own (its own token count, its id echoed), or refused naming ``request_id``:
    never refused for a reason that is not the client's fault, and never one's answer in the other's stream.
    Six at once over two workers: at least three share a worker while their 200-token answers overlap."""
    batch = [gateway_pb2.GenerateRequest(prompt=f"same id {i}", max_tokens=200 + i, ignore_eos=True,
                                         request_id="same-id", tenant=f"tenant-{i}") for i in range(6)]
    outcomes = live.fire(batch)
    for r, o in zip(batch, outcomes):
        if o.code == grpc.StatusCode.OK:
            final = o.replies[-1]
            assert final.finish_reason == "length" and final.request_id == "same-id"
            assert sum(len(x.token_ids) for x in o.replies) == final.metrics.completion_tokens == r.max_tokens
        else:
            assert o.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS), (o.code, o.details)
            assert o.details.startswith("request_id"), o.details
    assert any(o.code == grpc.StatusCode.OK for o in outcomes)
