"""Structured logs: grpc's report of a reply to a call whose client already left is one line, not a traceback;
any other exception keeps its traceback."""

from __future__ import annotations

import io
import json
import logging

from services import logs


def logged(exc: Exception) -> dict:
    """What a service's log says of ``exc`` logged by grpc's logger (the root logger is restored after)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    try:
        logs.setup("test")
        root.handlers[0].setStream(stream)
        try:
            raise exc
        except Exception:
            logging.getLogger("grpc._cython.cygrpc").exception("Unexpected [%s] raised by servicer method", "x")
    finally:
        root.handlers[:], root.level = saved, level
    return json.loads(stream.getvalue())


def test_a_reply_to_a_gone_call_is_one_line():
    entry = logged(RuntimeError("Failed \"execute_batch\": (<grpc._cython.cygrpc.SendStatusFromServerOperation "
                                "object at 0x7f>,)"))
    assert "exc" not in entry and entry["level"] == "info" and "client left first" in entry["msg"]


def test_other_exceptions_keep_their_traceback():
    entry = logged(ValueError("something else"))
    assert entry["level"] == "error" and "Traceback" in entry["exc"] and "something else" in entry["exc"]
