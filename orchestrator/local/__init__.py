"""A one-worker `difflm train` on this machine without Ray: the driver's supervisor and the worker process."""
