"""The Worker service and its engine: requests, KV blocks, scheduler, engine policies and executors."""
