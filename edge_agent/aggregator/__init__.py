"""The aggregator: a pure round state machine (rounds.py), its durable store (store.py), and the MQTT
service around them (service.py)."""
