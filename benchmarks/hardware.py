"""What the machine can do, and what a benchmarked block used.

Peak FLOP/s (a measured large matmul, or the datasheet figure for known
GPUs), wall time of a call, and peak memory: resident memory of this process
on the CPU, the allocator's statistics on accelerators.
"""

import ctypes
import gc
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core FLOP/s (no sparsity) from NVIDIA's datasheets, by a
# substring of `device_kind`; the first match counts, so the more specific
# names come first.
GPU_BF16_PEAK = (
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12),
    ('H200', 989e12), ('GH200', 989e12), ('B200', 2250e12),
    ('A100', 312e12), ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12),
)


def datasheet_peak(device_kind: str):
  """The datasheet bf16 peak of a GPU, or None if unknown."""
  for name, flops in GPU_BF16_PEAK:
    if name in device_kind:
      return flops
  return None


def seconds(fn) -> float:
  """Wall time of one call of fn, its results waited for."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def jax_matmul_flops(n: int, *, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` jitted [n, n] x [n, n] matmuls."""
  keys = jax.random.split(jax.random.PRNGKey(0))
  a, b = (jax.random.normal(k, (n, n), dtype) for k in keys)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return 2.0 * n ** 3 / min(seconds(lambda: matmul(a, b))
                            for _ in range(repeats))


def jax_matmul_flops_default_flags(n: int, *, repeats: int = 5) -> float:
  """`jax_matmul_flops` (float32) in a fresh process under XLA's default
  flags: bigjax's CPU flags (`bigjax.platform`) route matmuls away from
  YNNPACK, which runs a large one faster."""
  env = {**os.environ, 'XLA_FLAGS': ''}
  code = ('from benchmarks import hardware; '
          f'print(hardware.jax_matmul_flops({n}, repeats={repeats}))')
  done = subprocess.run([sys.executable, '-c', code], env=env, check=True,
                        capture_output=True, text=True)
  return float(done.stdout.split()[-1])


def torch_matmul_flops(n: int, *, device='cpu', repeats: int = 5) -> float:
  """The same with PyTorch (float32 on the CPU, bf16 on a GPU)."""
  import torch  # Only when torch is importable (benchmarks.run checks).
  dtype = torch.float32 if device == 'cpu' else torch.bfloat16
  a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
  best = float('inf')
  for _ in range(repeats + 1):  # The first call warms up.
    start = time.perf_counter()
    torch.matmul(a, b)
    if device != 'cpu':
      torch.cuda.synchronize()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def _status_bytes(field: str) -> int:
  """A memory field of /proc/self/status (e.g. VmRSS, VmHWM) in bytes."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def _release_free_memory() -> None:
  """Returns malloc's free pages to the system (glibc), so that memory freed
  by an earlier block is not silently reused by the next one's peak."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


class PeakRss:
  """Peak resident memory of this process during a `with` block, above the
  resident memory at its start (Linux): `.bytes` after the block.

  The high-water mark is reset at the start (writing 5 to
  /proc/self/clear_refs), so each block is measured on its own; memory the
  block allocates and frees counts at its peak. Where the reset is not
  allowed `.bytes` is None. The reset also lowers `getrusage`'s ru_maxrss
  to the current size: read that before the block and compare it with
  `.high_water_bytes` (the process's resident high-water mark at the end).
  """

  def __enter__(self):
    gc.collect()
    _release_free_memory()
    self.bytes = None
    self._start = _status_bytes('VmRSS')
    try:
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
      self._reset = True
    except OSError:
      self._reset = False
    return self

  def __exit__(self, *exc):
    self.high_water_bytes = _status_bytes('VmHWM')
    if self._reset:
      self.bytes = self.high_water_bytes - self._start


def device_peak_bytes():
  """The allocator's peak bytes in use on device 0 since the process
  started (accelerators), or None where it keeps no statistics (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return None if stats is None else stats.get('peak_bytes_in_use')


def compiled_bytes(compiled) -> dict:
  """XLA's memory analysis of a compiled step: what its buffers need.

  'total' is arguments + outputs + temporaries - aliased (donated inputs
  reused as outputs): the live bytes at the step's peak as XLA plans them.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  parts = {'argument': m.argument_size_in_bytes,
           'output': m.output_size_in_bytes,
           'temp': m.temp_size_in_bytes,
           'alias': m.alias_size_in_bytes}
  parts['total'] = (parts['argument'] + parts['output'] + parts['temp']
                    - parts['alias'])
  return parts
