"""difflm: a plain-PyTorch library of text diffusion language models.

Models, noise schedules, losses, samplers, data and tokenizers live here. This
package never imports ray or deepspeed; the distributed glue is in
``orchestrator/``. See docs/architecture.md.
"""

__version__ = "0.1.0"
