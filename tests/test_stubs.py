import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos():
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_generate_call_has_the_documented_fields():
    from services.rpc import gateway_pb2

    req = gateway_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    for name in ("prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "slo_class", "priority",
                 "tenant", "request_id"):
        assert name in req, name
    resp = gateway_pb2.GenerateResponse.DESCRIPTOR.fields_by_name
    assert {"text", "token_ids", "finish_reason", "metrics"} <= set(resp)
    metrics = resp["metrics"].message_type.fields_by_name
    assert {"prompt_tokens", "completion_tokens", "queue_ms", "ttft_ms", "tpot_ms", "e2e_ms", "worker_id",
            "preemptions"} <= set(metrics)
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods_by_name["Generate"]
    assert service.full_name == "tandem.v1.Gateway.Generate" and service.server_streaming
