"""Backends behind small protocols, each with an embedded and a networked implementation."""
