"""Wire formats: pure bytes in, bytes out. Never pickle."""
