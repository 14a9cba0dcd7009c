"""What every Tandem service is built from: stubs, server bootstrap, settings, telemetry, CLI, and the Profiler."""
