"""The device agent: local state and outbox (store.py), the service loop (service.py)."""
