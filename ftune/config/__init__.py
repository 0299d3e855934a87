"""Typed run configuration: schema, composition and validation."""
