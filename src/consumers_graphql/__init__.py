"""A GraphQL gateway over Consumers data, with the wire-compatible REST API beside it."""

__version__ = "0.1.0"
