"""Benchmarks behind ``difflm bench``: ASHA savings (``asha.py``), cached sampling (``sampling.py``)."""
