"""The Gateway: the public API, validation, auth, SLO classing, retries, and relaying the stream."""
