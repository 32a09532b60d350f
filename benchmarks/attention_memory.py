r"""Peak memory of attention forward + backward against sequence length.

  python -m benchmarks.attention_memory [--lengths=2048,4096,8192,16384] \
      [--kernels=einsum,xla,chunked] [--chunk_size=128] [--max_gb=8] \
      [--json=PATH]

One causal self-attention layer (`bigjax.models.attention.MultiHeadAttention`:
query/key/value projections, the kernel, the output projection) of width 256
with 4 heads, batch 1, float32; the step is the gradient of the sum of its
outputs with respect to its parameters and its input, jitted. Each (kernel,
length) runs in a fresh subprocess, which reports
  * plan: XLA's memory analysis of the compiled step, arguments + outputs +
    temporaries (what its buffers need at once, as XLA plans them);
  * run RSS: the peak resident memory one run of the compiled step added to
    the process (high-water mark reset just before; inputs, parameters and
    the compiled program already resident), on the CPU; on a GPU the
    allocator's peak above what was in use before the run;
  * maxrss: `getrusage` max RSS at the end minus its value after imports and
    input creation, so compilation included (CPU);
  * the time of one run (the second; the first may page memory in).
The table's memory column is the run RSS (CPU) or the allocator peak (GPU).
A configuration whose plan exceeds --max_gb is compiled but not run; its
plan is still reported. The 'cudnn' kernel runs on GPUs only.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402

from benchmarks import hardware  # noqa: E402
from benchmarks import report  # noqa: E402
from bigjax.models import attention  # noqa: E402

_LENGTHS = flags.DEFINE_list('lengths', ['2048', '4096', '8192', '16384'],
                             'Sequence lengths.')
_KERNELS = flags.DEFINE_list(
    'kernels', ['einsum', 'xla', 'chunked'],
    "Attention kernels (bigjax.models.attention.KERNELS); 'cudnn' on GPUs.")
_CHUNK_SIZE = flags.DEFINE_integer('chunk_size', 128,
                                   "Keys per chunk of the 'chunked' kernel.")
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_HEADS = flags.DEFINE_integer('num_heads', 4, 'Attention heads.')
_MAX_GB = flags.DEFINE_float('max_gb', 8.0,
                             'Run only configurations whose XLA plan needs at '
                             'most this many GiB.')
_CHILD = flags.DEFINE_string('child', None,
                             'Internal: measure KERNEL:LENGTH in this process '
                             'and print its record.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')


def _maxrss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(kernel: str, length: int) -> dict:
  """The record of one (kernel, length), measured in this process."""
  layer = attention.MultiHeadAttention(num_heads=_HEADS.value, kernel=kernel,
                                       chunk_size=_CHUNK_SIZE.value)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, length, _D_MODEL.value))
  # Parameters do not depend on the length: initialised on a short input.
  params = nn.unbox(jax.jit(lambda x: layer.init(
      jax.random.PRNGKey(1), x, train=False))(x[:, :16]))['params']
  jax.block_until_ready((x, params))
  maxrss_start = _maxrss_bytes()

  def loss(params, x):
    return layer.apply({'params': params}, x, is_causal=True,
                       train=False).sum()

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  plan = hardware.compiled_bytes(compiled)
  record = {'kernel': kernel, 'length': length, 'd_model': _D_MODEL.value,
            'num_heads': _HEADS.value, 'batch': 1,
            'chunk_size': _CHUNK_SIZE.value if kernel == 'chunked' else None,
            'plan_bytes': plan['total'], 'plan_temp_bytes': plan['temp'],
            'ran': plan['total'] <= _MAX_GB.value * 2 ** 30,
            'device': jax.devices()[0].device_kind}
  if not record['ran']:
    return record
  stats = jax.devices()[0].memory_stats()
  in_use = stats['bytes_in_use'] if stats else None
  maxrss_compiled = _maxrss_bytes()  # Before PeakRss resets it.
  with hardware.PeakRss() as rss:
    jax.block_until_ready(compiled(params, x))
  record['run_rss_bytes'] = rss.bytes
  record['maxrss_bytes'] = max(maxrss_compiled,
                               rss.high_water_bytes) - maxrss_start
  if in_use is not None:
    record['device_peak_bytes'] = hardware.device_peak_bytes() - in_use
  record['seconds'] = hardware.seconds(lambda: compiled(params, x))
  return record


def _run_child(kernel: str, length: int) -> dict:
  """`measure` in a fresh interpreter (this module with --child)."""
  flags_to_pass = [f'--{f.name}={f.value}' for f in (
      _CHUNK_SIZE, _D_MODEL, _HEADS, _MAX_GB)]
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.attention_memory',
       f'--child={kernel}:{length}', *flags_to_pass],
      capture_output=True, text=True, check=False)
  lines = [l for l in done.stdout.splitlines() if l.startswith('{')]
  if done.returncode or not lines:
    # E.g. killed for memory: report it rather than lose the other rows.
    return {'kernel': kernel, 'length': length, 'ran': False,
            'error': (done.stderr.strip().splitlines() or ['?'])[-1][:200],
            'returncode': done.returncode}
  return json.loads(lines[-1])


def _mb(record, key):
  value = record.get(key)
  return '-' if value is None else f'{value / 2 ** 20:,.0f}'


def main(argv):
  del argv
  if _CHILD.value:
    kernel, length = _CHILD.value.split(':')
    print(json.dumps(measure(kernel, int(length))), flush=True)
    return
  gpu = jax.devices()[0].platform == 'gpu'
  kernels = [k for k in _KERNELS.value if gpu or k != 'cudnn']
  records = []
  for length in sorted(int(n) for n in _LENGTHS.value):
    for kernel in kernels:
      records.append(_run_child(kernel, length))
      print(json.dumps(records[-1]), flush=True)
  memory_key = 'device_peak_bytes' if gpu else 'run_rss_bytes'
  report.write(records, [
      ('kernel', lambda r: r['kernel']),
      ('length', lambda r: f"{r['length']:,}"),
      ('XLA plan, MB', lambda r: _mb(r, 'plan_bytes')),
      ('run peak, MB' + (' (allocator)' if gpu else ' (RSS)'),
       lambda r: _mb(r, memory_key) if r['ran'] else 'not run'),
      ('maxrss incl. compile, MB', lambda r: _mb(r, 'maxrss_bytes')),
      ('fwd+bwd, s', lambda r: f"{r['seconds']:.2f}" if 'seconds' in r
       else r.get('error', '-')),
  ], json_path=_JSON.value, title=(
      f'Causal self-attention forward + backward, d_model {_D_MODEL.value}, '
      f'{_HEADS.value} heads, batch 1, float32, on '
      f'{jax.devices()[0].device_kind}; each row a fresh process'))


if __name__ == '__main__':
  app.run(main)
