"""Helpers for tests and the demo: a CPU shim for Megatron-Core and tiny model builders.

Nothing in the production path imports this package.
"""
