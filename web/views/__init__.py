"""Blueprints, one per area of API.md."""
