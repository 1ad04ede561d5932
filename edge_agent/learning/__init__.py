"""The learning core: pure numpy, no I/O, no transport. Arrays in, arrays out."""
