"""SLO classes (DESIGN.md): the defaults, and how a request's class resolves to targets."""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator


class SloClass(BaseModel):
    ttft_ms: float = Field(0.0, ge=0)
    tpot_ms: float = Field(0.0, ge=0)
    e2e_ms: float = Field(0.0, ge=0)
    sheddable: bool = False

    @model_validator(mode="after")
    def _has_a_target(self) -> "SloClass":
        if not (self.e2e_ms or self.ttft_ms):
            raise ValueError("an SLO class needs e2e_ms or ttft_ms (with tpot_ms)")
        return self


DEFAULT_CLASS = "interactive"

DEFAULT_SLO_CLASSES: dict[str, SloClass] = {
    "interactive": SloClass(ttft_ms=1000, tpot_ms=100),
    "code": SloClass(e2e_ms=2000),
    "batch": SloClass(e2e_ms=60_000, sheddable=True),
}


def resolve(cls: SloClass, ttft_ms: float = 0.0, tpot_ms: float = 0.0, e2e_ms: float = 0.0,
            scale: float = 1.0) -> SloClass:
    """A request's own targets: its class's, each multiplied by ``scale``, then any target the request sets
    itself (non-zero) in place of the class's. One rule for the gateway, replay and the simulator."""
    return SloClass(ttft_ms=ttft_ms or cls.ttft_ms * scale, tpot_ms=tpot_ms or cls.tpot_ms * scale,
                    e2e_ms=e2e_ms or cls.e2e_ms * scale, sheddable=cls.sheddable)


def met(slo: SloClass, ttft_ms: float, tpot_ms: float | None, e2e_ms: float) -> bool:
    """Whether an answer met its targets (DESIGN.md): a class with an E2E target by its last token's time, a
    TTFT class by its first token and, when it set a pace and there was more than one token, the mean gap
    after it (``tpot_ms`` None: one token). One rule for the benchmarks and the services' metrics."""
    if slo.e2e_ms:
        return e2e_ms <= slo.e2e_ms
    return ttft_ms <= slo.ttft_ms and (tpot_ms is None or not slo.tpot_ms or tpot_ms <= slo.tpot_ms)
