r"""Time per generated token of the cached decode step, against prefix length.

  python -m benchmarks.decode_speed [--prefix_lengths=32,64,128,256,512] \
      [--new_tokens=32] [--batch_size=1] [--repeats=15] [--json=FILE]

A Transformer language model (`DecoderLM`: 4 layers, d_model 256, 4 heads,
MLP 1024, vocabulary 256, learned positions) with random parameters. For
each prefix length P a prompt of P tokens is prefilled once; then
`new_tokens` cached decode steps (`bigjax.decoding.step`, greedy, in one
jitted `lax.while_loop` as in `bigjax.decoding`) run from that cache, whose
buffers hold P + new_tokens - 1 positions. Cached time per token is that
loop's wall time over new_tokens: the median of `repeats` rounds (each
round times every length once, in turn), compilation excluded.

For comparison, 'uncached' is one forward pass over P + 1 tokens, what each
new token costs when the model re-reads its whole prefix. Only the cached
step's attention read grows with P, so its time should grow far less than
the uncached one; the last row gives both ratios, longest / shortest prefix.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from bigjax import decoding  # noqa: E402
from bigjax.models import transformer  # noqa: E402

_PREFIX_LENGTHS = flags.DEFINE_list('prefix_lengths', ['32', '64', '128',
                                                       '256', '512'],
                                    'Prompt lengths to time.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 32,
                                   'Cached decode steps timed per run.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 1,
                                   'Sequences decoded at once.')
_REPEATS = flags.DEFINE_integer('repeats', 15,
                                'Timed rounds; the median counts.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')

VOCAB = 256


@functools.partial(jax.jit, static_argnames=('model', 'steps'))
def _decode(model, params, logits, cache, *, steps):
  """`steps` greedy cached decode steps from (logits [B, V], cache)."""
  def body(state):
    t, logits, cache = state
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return (t + 1, *decoding.step(model, params, cache, token))
  # A while_loop, as in bigjax.decoding's loops (a fori_loop of static
  # length would become a scan).
  return jax.lax.while_loop(lambda state: state[0] < steps, body,
                            (jnp.zeros((), jnp.int32), logits, cache))[1:]


def _seconds(fn):
  """Wall time of one fn() call, its results waited for."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def benchmark(prefix_lengths, *, new_tokens, batch_size, repeats):
  model = transformer.DecoderLM(
      vocab_size=VOCAB, d_model=256, num_layers=4, num_heads=4, mlp_dim=1024,
      max_len=max(prefix_lengths) + new_tokens)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, VOCAB, (batch_size,
                                                max(prefix_lengths) + 1)),
                       jnp.int32)
  params = nn.unbox(jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), tokens[:, :8]))['params']
  prefill = jax.jit(decoding.prefill, static_argnames=('model',
                                                       'max_new_tokens'))
  full = jax.jit(functools.partial(model.apply, train=False))
  runs = {}
  for length in prefix_lengths:
    logits, cache = prefill(model, params, tokens[:, :length],
                            max_new_tokens=new_tokens)
    runs[length] = {
        'cached': functools.partial(_decode, model, params, logits, cache,
                                    steps=new_tokens),
        'uncached': functools.partial(full, {'params': params},
                                      tokens[:, :length + 1])}
    for fn in runs[length].values():  # Compile outside the timing.
      jax.block_until_ready(fn())
  # Rounds visit every length in turn, so load from other processes falls
  # on all lengths alike rather than on whichever ran while it lasted.
  times = {(n, kind): [] for n in prefix_lengths for kind in runs[n]}
  for _ in range(repeats):
    for length, fns in runs.items():
      for kind, fn in fns.items():
        times[length, kind].append(_seconds(fn))
  records = []
  for length in prefix_lengths:
    records.append({
        'prefix_length': length, 'cache_length': length + new_tokens - 1,
        'cached_ms_per_token': 1e3 * statistics.median(
            times[length, 'cached']) / new_tokens,
        'uncached_ms_per_token': 1e3 * statistics.median(
            times[length, 'uncached']),
        'batch_size': batch_size, 'device': jax.devices()[0].device_kind})
    print(json.dumps(records[-1]), flush=True)
  return records


def main(argv):
  del argv
  lengths = sorted(int(n) for n in _PREFIX_LENGTHS.value)
  records = benchmark(lengths, new_tokens=_NEW_TOKENS.value,
                      batch_size=_BATCH_SIZE.value, repeats=_REPEATS.value)
  first, last = records[0], records[-1]
  ratio = {key: last[key] / first[key] for key in ('cached_ms_per_token',
                                                   'uncached_ms_per_token')}
  rows = records + [{'prefix_length': f'ratio {lengths[-1]}/{lengths[0]}',
                     **ratio}]
  is_ratio = lambda r: isinstance(r['prefix_length'], str)  # noqa: E731
  time_or_ratio = lambda key: lambda r: (  # noqa: E731
      f'{r[key]:.2f}x' if is_ratio(r) else f'{r[key]:.3f}')
  report.write(
      rows,
      [('prefix length', lambda r: str(r['prefix_length'])),
       ('cached step, ms/token', time_or_ratio('cached_ms_per_token')),
       ('uncached forward, ms/token', time_or_ratio('uncached_ms_per_token'))],
      json_path=_JSON.value,
      title=(f'DecoderLM 4x256, batch {_BATCH_SIZE.value}, '
             f'{_NEW_TOKENS.value} new tokens, median of {_REPEATS.value} '
             f'rounds on {jax.devices()[0].platform}'))


if __name__ == '__main__':
  app.run(main)
