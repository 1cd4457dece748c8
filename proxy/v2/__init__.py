"""The legacy V2 surface: request models, body parsing, image probing, handlers."""
