"""Data preparation glue: ``difflm data prepare|info`` (progress, specs) and the Ray Data runner for clusters.

The preparation itself (streaming, split, token shards, packing) is ``difflm.data.pipeline``;
this package only adds what needs Ray or a terminal.
"""
