"""Discrete-event simulator of the scheduling policies (`fastserve sim`)."""
