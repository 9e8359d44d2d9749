"""Sweeps: the sweep file (``spec.py``), the Ray Tune driver (``driver.py``), the live table
(``console.py``) and ranked results, CSV/JSON, HParams and plots (``results.py``)."""
