"""Ray Train, DeepSpeed, Tune, TensorBoard and CLI glue around the plain-PyTorch ``difflm`` library."""
