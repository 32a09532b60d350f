r"""Training-step speed of bigjax's default models, beside PyTorch references.

  python -m benchmarks.run [--suite=cpu|gpu] \
      [--models=cnn,lstm,transformer_lm,vit] [--steps=30] [--threads=N] \
      [--batch_size=B] [--compute_dtype=float32|bfloat16] [--torch=true] \
      [--torch_compile=false] \
      [--jax_variant=NAME:XLA_OPTION=VALUE ...] [--json=PATH]

For each model (`benchmarks.settings`: on the cpu suite the seeds' CNN and
LSTM, a small GPT and the ViT; on the gpu suite those and a 151M-parameter
GPT at sequence 2048 in bfloat16; each a config file plus overrides) this
builds the real bigjax
step as `train.train_and_evaluate` does (`train.build_experiment`, a jitted
`train.create_train_state`, `train.train_step` jitted with the state's
shardings and donated), compiled ahead of time, and runs it on one synthetic
batch of the right shapes: the input pipeline is neither needed nor timed.
It reports
  * the step time: median and quartiles of --steps steps after --warmup,
    each waited for, and examples (or tokens) per second;
  * FLOPs per step: analytic (`benchmarks.model_flops`), counted in the
    traced program, and XLA's `cost_analysis()` (which counts a loop body
    once: low for scanned models);
  * achieved FLOP/s (analytic FLOPs / median step) and MFU against the
    device peak: on the CPU the best of a jitted float32 matmul
    (--matmul_size) under bigjax's XLA flags and under XLA's defaults, on a
    GPU the datasheet bf16 dense peak (or --peak_tflops);
  * compile time (lower + compile of the step);
  * memory: XLA's plan for the step (arguments + outputs + temporaries -
    donated), and on the CPU the peak resident memory that creating the
    state and the first steps added to the process (compilation excluded),
    on a GPU the allocator's peak.

With torch importable (and --torch), the PyTorch reference of each model
(`benchmarks/torch_models.py`; the ViT has none) trains on the same batch,
float32, eager (and with --torch_compile also `torch.compile`d). The
frameworks' steps are timed in alternating rounds of --round_steps (each
round after one untimed step), so load from other jobs falls on both alike,
with the same number of threads; the table gives the JAX/PyTorch throughput
ratio (> 1: JAX is faster). Each --jax_variant adds the same JAX step
compiled with other XLA options to the rotation, e.g. YNNPACK's matmuls
(with its reductions), which bigjax's CPU flags use on two or more threads
and turn off on one (`bigjax.platform`):

  --jax_variant=ynn_dots:xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT

Both frameworks run in this one process under bigjax's process settings
(`bigjax.platform`: XLA:CPU flags, and glibc malloc keeping freed memory,
which spares both of them re-faulting their buffers every step).

Threads: torch's OpenMP pool waits for all its threads at every operation,
so when other jobs hold the cores it slows down far more than XLA's pool
(seen here: the LSTM's torch step 4-30x slower on 2 threads than on 1 with
the machine's load at 7 on 2 cores). On a shared machine compare with
--threads=1; use all cores only when the machine is otherwise idle.
Timings on a shared machine are noisy upper bounds: compare ratios from one
run rather than times from different runs.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from benchmarks import hardware  # noqa: E402
from benchmarks import model_flops  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import settings  # noqa: E402
from bigjax import sharding  # noqa: E402
from bigjax import train  # noqa: E402

_SUITE = flags.DEFINE_enum('suite', 'cpu', ['cpu', 'gpu'],
                           'Which device and peak: cpu (measured float32 '
                           'matmul) or gpu (datasheet bf16 peak).')
_MODELS = flags.DEFINE_list(
    'models', None, 'Models to benchmark (settings.SETTINGS); default: '
    'settings.SUITES[--suite].')
_COMPUTE_DTYPE = flags.DEFINE_enum(
    'compute_dtype', None, ['float32', 'bfloat16'],
    'config.precision.compute_dtype of every JAX step (default: float32 on '
    'the cpu suite, bfloat16 on the gpu suite). The PyTorch references are '
    'float32 and run only beside float32 steps.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 0, "Batch size of every model (0: each config's).")
_STEPS = flags.DEFINE_integer('steps', 30, 'Timed steps per framework.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps before timing.')
_ROUND_STEPS = flags.DEFINE_integer(
    'round_steps', 5, 'Timed steps per framework in each alternating round.')
_THREADS = flags.DEFINE_integer(
    'threads', 0, 'CPU threads for both frameworks: the process is pinned to '
    'that many of its cores, which sizes XLA:CPU\'s thread pool, and torch '
    'gets as many (0: all the cores it may use).')
_JAX_VARIANT = flags.DEFINE_multi_string(
    'jax_variant', [], 'NAME:OPTION=VALUE[;OPTION=VALUE]: also time the step '
    'compiled with these XLA options, interleaved with the others (a fair '
    'A/B of XLA flags on a busy machine), e.g. eigen_dots:'
    'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the PyTorch references '
                           '(when torch is importable).')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False,
                                   'Also time torch.compile of them.')
_MATMUL_SIZE = flags.DEFINE_integer(
    'matmul_size', 0, 'Side of the square matmul measuring the peak (0: '
    '2048 on the CPU, 8192 on a GPU).')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', 0.0, 'Device peak for MFU in TFLOP/s (0: measured matmul '
    'on the CPU, datasheet on a GPU).')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')

class JaxStep:
  """bigjax's train step of `config`, compiled, with its state and batch.

  As in `train.train_and_evaluate`: shardings from the config's mesh and
  rules, the state donated; `compiler_options` (XLA debug options, e.g.
  {'xla_cpu_experimental_ynn_fusion_type':
  'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}) apply to this compilation only.
  `start()` allocates the state and the batch; calling the object runs one
  step and waits for it.
  """

  def __init__(self, config, batch: dict, compiler_options=None):
    self.exp = exp = settings.synthetic_experiment(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.rules_from_config(config)
    init_fn = exp.init_state
    self._rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init_fn, self._rng)
    state_sharding = train.state_shardings(exp, abstract_state, mesh, rules)
    self._batch_sharding = sharding.batch_sharding(mesh, rules,
                                                   config.batch_size)
    self.step_fn = exp.train_step
    step = jax.jit(self.step_fn,
                   in_shardings=(state_sharding, self._batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(  # noqa: E731
        a.shape, a.dtype, sharding=s)
    self.abstract_state = jax.tree.map(with_sharding, abstract_state,
                                       state_sharding)
    self.abstract_batch = {k: with_sharding(v, self._batch_sharding)
                           for k, v in batch.items()}
    start = time.perf_counter()
    self.compiled = step.lower(self.abstract_state, self.abstract_batch
                               ).compile(compiler_options)
    self.compile_s = time.perf_counter() - start
    self._init = jax.jit(init_fn, out_shardings=state_sharding).lower(
        self._rng).compile()
    self._host_batch = batch
    self.state = self.batch = None

  def start(self):
    self.state = self._init(self._rng)
    self.batch = sharding.global_batch(self._host_batch, self._batch_sharding)

  def __call__(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def stop(self):
    self.state = self.batch = None


class TorchStep:
  """The PyTorch reference's train step on the same batch; calling the
  object runs one step and waits for it."""

  def __init__(self, config, model, batch: dict, *, total_steps: int,
               compile_model: bool, device: str):
    import torch  # noqa: F401  Checked importable by the caller.
    from benchmarks import torch_models
    self._torch = torch
    torch.manual_seed(config.seed)
    reference = torch_models.build(model, image_shape=settings.IMAGE_SHAPE,
                                   seq_len=config.data.seq_len).to(device)
    self.parameters = torch_models.parameter_count(reference)
    self.trainer = torch_models.Trainer(config, reference,
                                        total_steps=total_steps,
                                        compile_model=compile_model)
    self.batch = {k: v.to(device) for k, v in
                  torch_models.inputs(model, batch).items()}
    self._cuda = device != 'cpu'

  def __call__(self):
    self.trainer.step(self.batch)
    if self._cuda:
      self._torch.cuda.synchronize()


def interleaved_times(steps_by_name: dict, *, steps: int, round_steps: int):
  """Per-step seconds of each callable, `steps` each, in rotating rounds.

  Each round gives every callable one untimed step (its caches and threads
  warm again after the others ran) and then up to `round_steps` timed ones;
  the order rotates from round to round.
  """
  times = {name: [] for name in steps_by_name}
  names = list(steps_by_name)
  rounds = 0
  while min(len(t) for t in times.values()) < steps:
    shift = rounds % len(names)
    for name in names[shift:] + names[:shift]:
      step = steps_by_name[name]
      step()
      for _ in range(min(round_steps, steps - len(times[name]))):
        start = time.perf_counter()
        step()
        times[name].append(time.perf_counter() - start)
    rounds += 1
  return times


def _summary(times) -> dict:
  """Median, quartiles and all the step times (seconds)."""
  q1, _, q3 = (statistics.quantiles(times, n=4, method='inclusive')
               if len(times) > 1 else times * 3)
  return {'median_s': statistics.median(times), 'q1_s': q1, 'q3_s': q3,
          'min_s': min(times), 'steps': len(times),
          'step_seconds': [round(t, 6) for t in times]}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def benchmark(name: str, *, peak_flops: float, use_torch: bool,
              torch_compile: bool, torch_device: str, steps: int,
              warmup: int, round_steps: int, batch_size: int = 0,
              compute_dtype: str = 'float32', jax_variants=None) -> dict:
  """One model's record (module doc); batch_size 0 keeps the config's;
  jax_variants: {name: XLA compiler options} of extra JAX steps."""
  config = settings.load_config(name)
  config.batch_size = batch_size or config.batch_size
  config.precision.compute_dtype = compute_dtype
  batch = settings.synthetic_batch(config)
  jax_step = JaxStep(config, batch)
  items, unit = settings.items_per_step(config)
  record = {
      'model': name, 'config': settings.SETTINGS[name].config,
      'overrides': dict(settings.SETTINGS[name].overrides),
      'batch_size': config.batch_size, 'items_per_step': items, 'unit': unit,
      'compute_dtype': compute_dtype,
      'parameters': train.parameter_counts(jax_step.exp)['unique'],
      'analytic_flops': model_flops.train_flops(
          jax_step.exp.model, batch_size=config.batch_size,
          image_shape=settings.IMAGE_SHAPE, seq_len=config.data.seq_len),
      'jaxpr_flops': model_flops.jaxpr_flops(
          jax_step.step_fn, jax_step.abstract_state, jax_step.abstract_batch),
      'xla_flops': model_flops.xla_flops(jax_step.compiled),
      'compile_s': jax_step.compile_s,
      'xla_memory_bytes': hardware.compiled_bytes(jax_step.compiled),
  }
  runners = {}
  if use_torch and _has_reference(jax_step.exp.model):
    runners = _torch_steps(config, jax_step.exp, batch, record,
                           torch_compile=torch_compile, device=torch_device,
                           warmup=warmup)
  # After torch's: XLA may free a step's buffers on its own threads after
  # the step returns, which would fall into a block measured next.
  with hardware.PeakRss() as rss:
    jax_step.start()
    for _ in range(warmup):
      jax_step()
  record['jax_rss_peak_bytes'] = rss.bytes
  record['device_peak_bytes'] = hardware.device_peak_bytes()
  variants = {}
  for variant, options in (jax_variants or {}).items():
    variants[f'jax:{variant}'] = JaxStep(config, batch, options)
    variants[f'jax:{variant}'].start()
    record[f'jax:{variant}_options'] = options
  runners = {'jax': jax_step, **variants, **runners}
  times = interleaved_times(runners, steps=steps, round_steps=round_steps)
  for key, t in times.items():
    record[key] = _summary(t)
    record[key]['items_per_s'] = items / record[key]['median_s']
  for step in (jax_step, *variants.values()):
    step.stop()
  median = record['jax']['median_s']
  record['achieved_flops_per_s'] = record['analytic_flops'] / median
  record['mfu'] = record['achieved_flops_per_s'] / peak_flops
  for key in runners:
    if key != 'jax':
      record[f'jax_vs_{key}'] = record[key]['median_s'] / median
  print(json.dumps({k: v for k, v in record.items()
                    if k not in runners}), flush=True)
  return record


def _torch_steps(config, exp, batch, record, *, torch_compile: bool,
                 device: str, warmup: int) -> dict:
  """The PyTorch references' steps, warmed up: {'torch': ..., and with
  torch_compile 'torch_compile': ...}. Adds their parameter counts (which
  must equal ours), peak RSS of creation and warm-up, and torch.compile's
  first-step time to `record`."""
  steps = {}
  for key, compile_model in [('torch', False)] + (
      [('torch_compile', True)] if torch_compile else []):
    with hardware.PeakRss() as rss:
      step = TorchStep(config, exp.model, batch, total_steps=exp.num_steps,
                       compile_model=compile_model, device=device)
      start = time.perf_counter()
      step()
      first_s = time.perf_counter() - start
      for _ in range(warmup - 1):
        step()
    if step.parameters != record['parameters']:
      raise AssertionError(
          f'{record["model"]}: the torch reference has {step.parameters:,} '
          f'trainable parameters, bigjax {record["parameters"]:,}')
    record[f'{key}_parameters'] = step.parameters
    if compile_model:  # Its RSS would be the compiler's.
      record['torch_compile_s'] = first_s
    else:
      record[f'{key}_rss_peak_bytes'] = rss.bytes
    steps[key] = step
  return steps


def _has_reference(model) -> bool:
  from benchmarks import torch_models  # Only with torch importable.
  return torch_models.has_reference(model)


def _ms(record, key):
  if key not in record:
    return '-'
  r = record[key]
  return (f"{1e3 * r['median_s']:.1f} ({1e3 * r['q1_s']:.1f}-"
          f"{1e3 * r['q3_s']:.1f})")


def _mb(n):
  return '-' if n is None else f'{n / 2 ** 20:.0f}'


def _torch_device(suite: str, threads: int):
  """Where the references run ('cpu' or 'cuda'), or None without them."""
  if not (_TORCH.value and torch_available()):
    return None
  import torch
  if suite == 'gpu':
    if torch.cuda.is_available():
      return 'cuda'
    print('torch has no GPU here: PyTorch references skipped')
    return None
  torch.set_num_threads(threads)  # As many as XLA:CPU's pool.
  return 'cpu'


def measure_machine(suite: str, threads: int, torch_device) -> dict:
  """The device, versions, matmul speeds and the peak MFU is taken of."""
  device = jax.devices()[0]
  gpu = suite == 'gpu'
  n = _MATMUL_SIZE.value or (8192 if gpu else 2048)
  matmul = hardware.jax_matmul_flops(
      n, dtype=jax.numpy.bfloat16 if gpu else jax.numpy.float32)
  # On the CPU the peak is the best matmul measured, whichever XLA flags.
  default_flags = None if gpu else hardware.jax_matmul_flops_default_flags(n)
  peak = (_PEAK_TFLOPS.value * 1e12
          or (hardware.datasheet_peak(device.device_kind) if gpu
              else max(matmul, default_flags)))
  if peak is None:
    raise SystemExit(f'no datasheet peak for {device.device_kind!r}; pass '
                     '--peak_tflops')
  torch = __import__('torch') if torch_device else None
  return {
      'device': device.device_kind, 'platform': device.platform,
      'threads': threads, 'jax_version': jax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'torch_version': torch.__version__ if torch else None,
      'matmul_size': n, 'jax_matmul_flops_per_s': matmul,
      'jax_matmul_default_flags_flops_per_s': default_flags,
      'torch_matmul_flops_per_s': (
          hardware.torch_matmul_flops(n, device=torch_device) if torch
          else None),
      'peak_flops_per_s': peak,
      'peak_source': ('--peak_tflops' if _PEAK_TFLOPS.value else
                      'datasheet bf16 dense' if gpu else
                      f'best jitted float32 {n}^2 matmul, bigjax or '
                      'default XLA flags')}


def write_tables(records, machine: dict) -> None:
  """The speed table, then FLOPs and memory (and the JSON file)."""
  m = machine
  columns = [
      ('model', lambda r: r['model']),
      ('params', lambda r: f"{r['parameters']:,}"),
      ('batch', lambda r: str(r['batch_size'])),
      ('JAX step, ms', lambda r: _ms(r, 'jax')),
      ('JAX items/s', lambda r: f"{r['jax']['items_per_s']:,.0f} "
                                f"{r['unit'][:3]}"),
      ('torch step, ms', lambda r: _ms(r, 'torch')),
      ('JAX/torch speed', lambda r: _ratio(r, 'jax_vs_torch')),
  ]
  for variant in _parse_variants(_JAX_VARIANT.value):
    key = f'jax:{variant}'
    columns += [(f'JAX {variant} step, ms', lambda r, k=key: _ms(r, k)),
                (f'{variant} speed vs JAX',
                 lambda r, k=key: _ratio(r, f'jax_vs_{k}', invert=True))]
  if _TORCH_COMPILE.value:
    columns += [('torch.compile step, ms', lambda r: _ms(r, 'torch_compile')),
                ('JAX/compiled speed',
                 lambda r: _ratio(r, 'jax_vs_torch_compile'))]
  report.write(records, columns, title=(
      f"{m['device']}, {m['threads']} threads, median (quartiles) of "
      f"{_STEPS.value} steps"))
  gpu = m['platform'] == 'gpu'
  matmuls = ', '.join(
      f'{name} {m[key] / 1e9:,.1f}' for name, key in (
          ('JAX', 'jax_matmul_flops_per_s'),
          ('JAX with default XLA flags',
           'jax_matmul_default_flags_flops_per_s'),
          ('torch', 'torch_matmul_flops_per_s')) if m[key])
  report.write(records, [
      ('model', lambda r: r['model']),
      ('GFLOP/step analytic', lambda r: f"{r['analytic_flops'] / 1e9:.2f}"),
      ('traced', lambda r: f"{r['jaxpr_flops'] / 1e9:.2f}"),
      ('XLA', lambda r: f"{r['xla_flops'] / 1e9:.2f}"),
      ('achieved GFLOP/s', lambda r: f"{r['achieved_flops_per_s'] / 1e9:.1f}"),
      ('MFU', lambda r: f"{100 * r['mfu']:.1f}%"),
      ('compile, s', lambda r: f"{r['compile_s']:.1f}"),
      ('XLA plan, MB', lambda r: _mb(r['xla_memory_bytes'].get('total'))),
      ('device peak, MB' if gpu else 'peak RSS +MB JAX / torch',
       lambda r: (_mb(r['device_peak_bytes']) if gpu else
                  f"{_mb(r['jax_rss_peak_bytes'])} / "
                  f"{_mb(r.get('torch_rss_peak_bytes'))}")),
  ], json_path=_JSON.value, title=(
      f"Peak {m['peak_flops_per_s'] / 1e9:,.0f} GFLOP/s ({m['peak_source']}); "
      f"{m['matmul_size']}^2 matmul GFLOP/s: {matmuls}"))


def _parse_variants(specs) -> dict:
  """{'NAME': {option: value}} from --jax_variant values."""
  variants = {}
  for spec in specs:
    name, _, options = spec.partition(':')
    variants[name] = dict(o.split('=', 1) for o in options.split(';') if o)
  return variants


def _ratio(record, key, invert=False):
  if key not in record:
    return '-'
  return f'{1 / record[key] if invert else record[key]:.2f}x'


def main(argv):
  del argv
  suite = _SUITE.value
  if _THREADS.value:  # Before the backend starts: XLA sizes its pool then.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_THREADS.value])
    # bigjax's XLA:CPU flags depend on the thread count (bigjax.platform).
    platform.set_cpu_xla_flags()
  threads = len(os.sched_getaffinity(0))
  platform_name = jax.devices()[0].platform
  if (suite == 'gpu') != (platform_name == 'gpu'):
    raise SystemExit(f'--suite={suite} but JAX runs on {platform_name}')
  torch_device = _torch_device(suite, threads)
  machine = measure_machine(suite, threads, torch_device)
  machine['load_average'] = os.getloadavg()[0]
  print(json.dumps(machine), flush=True)
  if torch_device == 'cpu' and threads > 1 and (
      machine['load_average'] > os.cpu_count() / 2):
    print(f"Load average {machine['load_average']:.1f} on {os.cpu_count()} "
          'cores: torch slows down more than JAX on busy cores; compare '
          'with --threads=1 (module doc)', flush=True)
  compute_dtype = _COMPUTE_DTYPE.value or (
      'bfloat16' if suite == 'gpu' else 'float32')
  records = [{**benchmark(name, peak_flops=machine['peak_flops_per_s'],
                          compute_dtype=compute_dtype,
                          use_torch=(torch_device is not None
                                     and compute_dtype == 'float32'),
                          torch_compile=_TORCH_COMPILE.value,
                          torch_device=torch_device or 'cpu',
                          steps=_STEPS.value, warmup=_WARMUP.value,
                          round_steps=_ROUND_STEPS.value,
                          batch_size=_BATCH_SIZE.value,
                          jax_variants=_parse_variants(_JAX_VARIANT.value)),
              **machine}
             for name in _MODELS.value or settings.SUITES[suite]]
  write_tables(records, machine)


if __name__ == '__main__':
  app.run(main)
