"""The upstream: V3 reply models, the typed client, and the V3 request body."""
