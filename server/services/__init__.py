"""Servicers: thin adapters, protobuf in -> domain call -> protobuf out."""
