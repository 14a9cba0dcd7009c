"""Executors run a scheduled batch and return the sampled tokens: ``sim`` here, ``torch`` and ``vllm`` as extras."""
