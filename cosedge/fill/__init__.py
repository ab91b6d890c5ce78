"""Fills: copying missing objects from their origin, one flight per key."""
