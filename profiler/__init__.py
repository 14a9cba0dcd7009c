"""The Profiler: latency profiles per (model, GPU type, executor) and output-length predictions."""
