"""edge-fl: federated personalization layers for edge devices."""

__version__ = "0.1.0"
