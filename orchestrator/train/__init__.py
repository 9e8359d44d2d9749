"""One training run: driver (``launch.py``), Ray Train worker (``worker.py``), the loop (``runner.py``),
engines (``engine.py``), checkpoints, metrics and the console. Only ``launch``/``worker`` touch Ray."""
