"""Typed config schemas (ConfigStore), composition helpers and validation."""
