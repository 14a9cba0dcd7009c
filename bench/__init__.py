"""Measurement: trace loaders, the replay client, metric definitions, benchmarks and reports."""
