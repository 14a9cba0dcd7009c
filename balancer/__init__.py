"""The Balancer: worker registry, load reports, routing policies."""
