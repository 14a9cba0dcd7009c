"""What the balancer must know about the workers' engine policies without importing them (it sits beside the
workers, not above them). A test checks these names against the engine policy classes."""

from __future__ import annotations

#: Engine policies that order their own queue by SLO and triage it (``workers.policies.slo_aware``): the
#: balancer binds requests to them at once rather than holding a queue of its own in front of them.
TRIAGING_ENGINE_POLICIES = frozenset({"adaptive", "edf", "sage", "sa_slo", "larry", "slob"})

#: Prefill tokens such an engine adds to a step beside its decodes, by default (``SloAwarePolicy.prefill_chunk``):
#: small chunks keep every decode step short enough for TPOT targets while prompts stream in.
PREFILL_CHUNK = 512

#: Trailing metadata a worker sets when its engine's triage refused a request (sheddable, can no longer meet its
#: SLO): the gateway passes the RESOURCE_EXHAUSTED and its ``retry-after-ms`` to the client instead of retrying.
REFUSED_KEY = "tandem-refused"
