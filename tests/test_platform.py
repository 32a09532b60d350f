"""Process-wide settings: the host allocator keeps what XLA frees."""

import os
import subprocess
import sys

import pytest

# Allocates a 200 MB block from a thread (as XLA:CPU's workers do), frees
# it, allocates it again and prints the page faults the second allocation
# took to fill. Run in a fresh process: allocator settings are per process
# and must precede the threads.
_REUSE = r'''
import ctypes, resource, sys, threading
from bigjax import platform
print(platform.keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 200 * 2 ** 20
faults = []

def fill():
  p = libc.malloc(n)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  ctypes.memset(p, 1, n)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  libc.free(p)

for _ in range(2):
  thread = threading.Thread(target=fill)
  thread.start()
  thread.join()
print(faults[1])
'''


def _run(env_overrides):
  env = {k: v for k, v in os.environ.items()
         if k not in ('BIGJAX_KEEP_FREED_MEMORY', 'MALLOC_ARENA_MAX',
                      'GLIBC_TUNABLES', 'LD_PRELOAD')}
  env.update(env_overrides)
  out = subprocess.run([sys.executable, '-c', _REUSE], env=env,
                       capture_output=True, text=True, check=True).stdout
  applied, faults = out.split()
  return applied == 'True', int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc options')
def test_freed_blocks_are_reused_without_page_faults():
  applied, faults = _run({})
  assert applied
  # 200 MB is 51,200 pages of 4 KB: refilled from the kept heap, none fault.
  assert faults < 1000, faults


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='glibc malloc options')
def test_opting_out_leaves_glibc_defaults():
  applied, faults = _run({'BIGJAX_KEEP_FREED_MEMORY': '0'})
  assert not applied
  # glibc's default: a block this large is a fresh mmap, faulted page by
  # page each time (huge pages could make it fewer, never under 100).
  assert faults > 100, faults
  applied, _ = _run({'MALLOC_ARENA_MAX': '2'})
  assert not applied  # The user's own malloc settings win.


# Prints $XLA_FLAGS after set_cpu_xla_flags for one core, then for two (as
# benchmarks.run does after pinning itself), in a fresh process: the flags
# are process-wide.
_FLAGS = r'''
import os
from bigjax import platform
platform.set_cpu_xla_flags(threads=1)
print(os.environ['XLA_FLAGS'])
platform.set_cpu_xla_flags(threads=2)
print(os.environ['XLA_FLAGS'])
'''


def _flags_after(xla_flags):
  env = {**os.environ, 'XLA_FLAGS': xla_flags}
  return subprocess.run([sys.executable, '-c', _FLAGS], env=env,
                        capture_output=True, text=True,
                        check=True).stdout.splitlines()


def test_dot_library_follows_the_thread_count():
  one, two = _flags_after('--xla_force_host_platform_device_count=2')
  ynn = '--xla_cpu_experimental_ynn_fusion_type='
  # One core: XLA's own matmuls; more: YNNPACK's. Convolutions never go to
  # YNNPACK; the user's other flags stay, and a second call replaces ours.
  assert one.split() == ['--xla_force_host_platform_device_count=2',
                         ynn + '-individual_dot,-individual_convolution']
  assert two.split() == ['--xla_force_host_platform_device_count=2',
                         ynn + '-individual_convolution']


def test_users_dot_library_wins():
  mine = '--xla_cpu_experimental_ynn_fusion_type=-reduce'
  assert _flags_after(mine) == [mine, mine]
