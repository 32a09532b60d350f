"""Process-wide settings, applied by entry points before JAX starts.

XLA flags, the host allocator, the compilation cache and joining a
multi-process job. This module must not import jax at the top: XLA reads
XLA_FLAGS once, when the first backend is created, and the allocator
settings must precede the threads JAX starts.
"""

import contextlib
import ctypes
import os
import sys

# XLA:CPU routes dots, convolutions and reductions to YNNPACK by default.
# Convolutions stay off YNNPACK: the CNN's training step was 30-50% faster
# without it (shared/PITFALLS.md). Dots depend on the threads XLA runs on
# (its pool has one per core the process may use):
# - one core: XLA's own (Eigen) matmuls. With YNNPACK's the benchmark GPT's
#   step was 0-5% slower, the LSTM's 7% (jaxlib 0.10.2; sessions before
#   found 7-13% for the GPT);
# - two or more: YNNPACK's. Eigen splits every matmul over the pool and
#   waits for it, which costs more than it gains on the attention's and the
#   LSTM's small matmuls (8 x [128, 64] . [64, 256]: 123 -> 92 GFLOP/s from
#   one to two threads). Same models, both cores, YNNPACK's against Eigen's
#   (`benchmarks.run --threads=2 --jax_variant=...`): GPT 1.21x, LSTM 1.11x,
#   CNN 1.07x, ViT 1.88x faster.
# YNNPACK's reductions stay on: without them XLA turns the bias gradients'
# sums into strided reduce-windows (60 ms each for a [32, 256, 1024]
# gradient), and the benchmark GPT's step took 12% longer (2.47 against
# 2.17 s, one core, jaxlib 0.10.2). Re-measure after any jaxlib upgrade
# with `python -m benchmarks.run` at --threads=1 and --threads=2.
_YNN_FUSION_TYPES = {1: '-individual_dot,-individual_convolution',
                     2: '-individual_convolution'}


def cpu_xla_flags(threads: int) -> tuple[str, ...]:
  """bigjax's XLA:CPU flags for a process that XLA runs on `threads` cores."""
  return ('--xla_cpu_experimental_ynn_fusion_type='
          + _YNN_FUSION_TYPES[min(max(threads, 1), 2)],)


def cpu_threads() -> int:
  """The cores this process may run on: the size of XLA:CPU's pool."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS has no affinity masks.
    return os.cpu_count() or 1


# The flags set_cpu_xla_flags put into $XLA_FLAGS itself (not the user's),
# which a later call may replace.
_OURS: list[str] = []


# glibc malloc's options (mallopt(3) numbers) that keep freed memory in the
# process: one arena (M_ARENA_MAX, -8) so that every thread allocates from
# the brk heap, no mmap for large blocks (M_MMAP_MAX, -4) and no trimming
# (M_TRIM_THRESHOLD, -1; the value -1 disables it). XLA:CPU allocates a
# step's temporaries as one block (1.09 GB for the benchmark GPT, 65 MB for
# the CNN) and frees it after the step. glibc serves blocks over 32 MB with
# a fresh mmap, so every step faulted its temporaries in anew, page by page:
# 266k page faults per GPT step, 16k per CNN step. Kept, they cost nothing:
# GPT 2.19 -> 1.88 s, CNN 75 -> 57 ms a step (one core, jaxlib 0.10.2).
# The cost: the process keeps its peak heap, as tcmalloc or jemalloc would,
# and that peak can hold two steps' temporaries (XLA may allocate the next
# step's block before it frees the last one's, and a kept block then sits
# beside the new one): the benchmark GPT settles at 2.92 GB resident after
# 6 steps, against 1.87 GB with BIGJAX_KEEP_FREED_MEMORY=0, and stays there.
_MALLOPT = {'M_ARENA_MAX': (-8, 1), 'M_MMAP_MAX': (-4, 0),
            'M_TRIM_THRESHOLD': (-1, -1)}
# The environment variables by which a user sets glibc malloc options
# themselves (ours then stay off), and LD_PRELOAD, which may replace malloc.
_MALLOC_ENVIRONMENT = ('MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_',
                       'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_',
                       'GLIBC_TUNABLES', 'LD_PRELOAD')


def set_cpu_xla_flags(threads: int | None = None) -> None:
  """Adds `cpu_xla_flags` to $XLA_FLAGS unless the user already set them,
  and keeps freed host memory in the process (`keep_freed_memory`).

  threads: the cores XLA will use; by default the ones this process may run
  on now. XLA reads $XLA_FLAGS when its backend starts, so a program that
  pins itself to fewer cores afterwards (benchmarks.run --threads) calls
  this again, before touching a device, to replace the flags chosen here.
  The flags only touch XLA:CPU, so they are harmless on GPU/TPU hosts.
  """
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if f not in _OURS]
  _OURS.clear()
  for flag in cpu_xla_flags(threads or cpu_threads()):
    if not any(f.split('=')[0] == flag.split('=')[0] for f in flags):
      flags.append(flag)
      _OURS.append(flag)
  os.environ['XLA_FLAGS'] = ' '.join(flags)
  keep_freed_memory()


def keep_freed_memory() -> bool:
  """Sets glibc malloc to keep freed memory for reuse (see _MALLOPT).

  Does nothing, and returns False, where malloc is not glibc's (macOS,
  musl), when the user chose malloc settings through the environment
  (_MALLOC_ENVIRONMENT), or when BIGJAX_KEEP_FREED_MEMORY=0. It must run
  before JAX starts its threads: a thread keeps the arena it first used.
  """
  if (os.environ.get('BIGJAX_KEEP_FREED_MEMORY', '1') == '0'
      or any(os.environ.get(k) for k in _MALLOC_ENVIRONMENT)
      or not sys.platform.startswith('linux')):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (AttributeError, OSError):  # Not glibc.
    return False
  return all(mallopt(param, value) == 1 for param, value in _MALLOPT.values())


def initialize_distributed(*, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None,
                           auto: bool = False) -> None:
  """Joins this process to a multi-process JAX job, if asked to.

  With `coordinator_address` (host:port of process 0), `num_processes` and
  `process_id`, a manual launch (e.g. several processes on one machine or a
  hand-written launcher). With `auto`, JAX detects the cluster (Cloud TPU,
  SLURM, Open MPI, Kubernetes). Neither: a single-process run.

  Must run before anything touches devices. CPU processes talk through gloo
  collectives (without them cross-process CPU computations fail); the
  setting only concerns the CPU backend, so it is harmless on GPU/TPU.
  """
  if coordinator_address is None and not auto:
    return
  import jax  # Imported late: setting XLA flags above must precede jax.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if coordinator_address is None:
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)


@contextlib.contextmanager
def compilation_cache(directory: str):
  """Keeps the XLA programs compiled inside the block in `directory`.

  A program compiled before, here or by an earlier process, is then read
  back instead of compiled again: an ablation compiles the same programs
  (init, train and eval steps, checkpoint fingerprints) once per seed and
  again after a restart. On the 2-core machine (load ~6) a 5-step seq2seq
  run took 75-81 s cold and 10 s with its programs cached, with bitwise
  equal results. If the user already set `jax_compilation_cache_dir`, that
  cache is used and nothing changes; otherwise the previous settings come
  back on exit, so the process does not keep writing into `directory`.
  """
  import jax  # Imported late: setting XLA flags above must precede jax.
  from jax.experimental.compilation_cache import compilation_cache as cache
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_compilation_cache_dir', directory)
  # Every program: a run's many sub-second compiles add up to most of a
  # short run's compile time.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  try:
    yield
  finally:
    jax.config.update('jax_compilation_cache_dir', None)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', previous)
    cache.reset_cache()
