"""Executors run a scheduled batch and return the sampled tokens: ``sim`` here, ``torch`` with its extra."""
