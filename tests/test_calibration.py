"""Calibration: the Profiler profiles a live worker with probe batches, fits the latency model by least squares,
stores it in SQLite and serves it; on a CPU torch worker the fit predicts a fresh mix of steps within 15%."""

from __future__ import annotations

import statistics

import grpc
import pytest

from services.cluster import ClusterSpec, WorkerSpec
from services.fit import FittedLatency, Probe, default_probes, fit
from services.profiles import from_profile
from profiler.store import ProfileStore
from services.rpc import profiler_pb2, profiler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers import start_stack

FRESH_MIX = [Probe(prefill_tokens=p) for p in (48, 96, 200, 400, 700)] + \
    [Probe(batch=b, context=c) for b, c in ((3, 100), (6, 300), (12, 60), (24, 200), (5, 700), (40, 90))]


def test_fit_recovers_known_coefficients():
    truth = FittedLatency(0.002, 0.0001, 0.003, 0.0005, 0.000002, a2=1e-8)
    probes = default_probes(2048, 64, 4096, 1 << 20)
    model, pre_err, dec_err = fit(probes, [truth.predict_probe(p) for p in probes])
    assert model.a1 == pytest.approx(truth.a1) and model.c2 == pytest.approx(truth.c2)
    assert model.a2 == pytest.approx(truth.a2)
    assert pre_err < 1e-9 and dec_err < 1e-9
    with pytest.raises(ValueError, match="at least 3 prefill"):
        fit(probes[:1], [0.1])


def test_store_persists_across_restarts(tmp_path):
    db = tmp_path / "profiles.sqlite"
    store = ProfileStore(db)
    store.put(profiler_pb2.LatencyProfile(model="m", gpu_type="A10", executor="torch", fitted=True, prefill_a1=0.5))
    store.close()
    again = ProfileStore(db).get("m", "a10", "torch")
    assert again is not None and again.prefill_a1 == 0.5 and again.fitted


@pytest.mark.slow
def test_calibrated_torch_worker_predicts_a_fresh_mix_within_15_percent(tmp_path):
    pytest.importorskip("torch")
    from workers.executors.checkpoint import make_tiny_llama

    # big enough that steps take milliseconds of real compute rather than dispatch jitter, as on a GPU
    folder = make_tiny_llama(tmp_path / "ckpt", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
                             intermediate_size=688, max_position_embeddings=2048)
    # one intra-op thread: on a shared 2-core machine, two threads contend with the other services and the
    # step times jitter far more than the model's own cost varies
    spec = ClusterSpec(workers=[WorkerSpec(id="cpu-0", executor="torch", model=str(folder), kv_blocks=4096,
                                           torch_threads=1, max_num_batched_tokens=1024)])
    stack = start_stack(spec, tmp_path / "logs")
    try:
        with grpc.insecure_channel(stack.profiler_address) as pch, \
                grpc.insecure_channel(stack.worker_address("cpu-0")) as wch:
            profiler = profiler_pb2_grpc.ProfilerStub(pch)
            worker = worker_pb2_grpc.WorkerStub(wch)
            specs = [worker_pb2.ProbeSpec(prefill_tokens=p.prefill_tokens, batch=p.batch, context=p.context)
                     for p in FRESH_MIX]
            # warm the fresh worker first (allocator, kernels), so neither the fit nor the check sees a cold start
            worker.Profile(worker_pb2.ProfileRequest(probes=specs, repeats=3), timeout=600)
            # the fresh mix is measured on both sides of the calibration and each step's faster median is kept;
            # another process on this shared machine (a fresh clone's venv still being written out, say) can
            # slow a stretch of seconds, which is noise, not the model's error: so a miss is calibrated and
            # checked once more, and the second attempt is the verdict
            for attempt in range(2):
                before = worker.Profile(worker_pb2.ProfileRequest(probes=specs, repeats=9), timeout=600)
                reply = profiler.Calibrate(profiler_pb2.CalibrateRequest(
                    worker_address=stack.worker_address("cpu-0"), repeats=7), timeout=600)
                served = profiler.GetProfile(profiler_pb2.GetProfileRequest(model=str(folder), gpu_type="CPU",
                                                                            executor="torch"), timeout=5)
                after = worker.Profile(worker_pb2.ProfileRequest(probes=specs, repeats=9), timeout=600)
                model = from_profile(reply.profile)
                fresh = [min(b.step_ms, a.step_ms) for b, a in zip(before.results, after.results)]
                errors = [abs(model.predict_probe(probe) - ms / 1000) / (ms / 1000)
                          for probe, ms in zip(FRESH_MIX, fresh)]
                print(f"\ncalibration {attempt + 1}: fit errors prefill {reply.prefill_median_error:.1%} decode "
                      f"{reply.decode_median_error:.1%}; fresh mix median error {statistics.median(errors):.1%} "
                      f"over {len(errors)} steps")
                if statistics.median(errors) < 0.15:
                    break
    finally:
        stack.stop()
    assert served.source == "calibrated" and served.fitted and served == reply.profile
    assert statistics.median(errors) < 0.15, (errors, reply)
