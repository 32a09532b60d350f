"""Process-wide XLA settings, applied by entry points before JAX starts.

This module must not import jax: XLA reads XLA_FLAGS once, when the first
backend is created.
"""

import os

# XLA:CPU routes dots, convolutions and reductions to YNNPACK by default.
# Turning those fusions off made the CNN training step 30-50% faster and the
# GPT step 7-13% faster on the 2-core CI machine (shared/PITFALLS.md;
# re-measure after any jaxlib upgrade with `python -m benchmarks.run`).
CPU_XLA_FLAGS = (
    '--xla_cpu_experimental_ynn_fusion_type='
    '-individual_dot,-individual_convolution,-reduce',
)


def set_cpu_xla_flags() -> None:
  """Adds CPU_XLA_FLAGS to $XLA_FLAGS unless the user already set them.

  They only touch XLA:CPU, so they are harmless on GPU/TPU hosts.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in CPU_XLA_FLAGS:
    if flag.split('=')[0] not in flags:
      flags = f'{flags} {flag}'.strip()
  os.environ['XLA_FLAGS'] = flags
