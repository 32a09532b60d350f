r"""Compile time of a Transformer train step against depth.

  python -m benchmarks.compile_time [--layers=2,24] [--d_model=256] \
      [--num_heads=4] [--seq_len=128] [--cross_layer_sharing=none] \
      [--json=results.json]

For each depth, builds a `DecoderLM` and times `jax.jit(train_step).lower()`
and `.compile()` of one step (forward, value_and_grad, Adam update) from
abstract shapes: no parameter is materialised and nothing runs. Because the
layers are one `nn.scan`, the compiled program holds one block whatever the
depth, so the deepest stack should compile within ~1.5x of the shallowest.
Prints one JSON record per depth and a Markdown table with the ratio to the
first depth.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks import report  # noqa: E402
from bigjax.models import param_counts  # noqa: E402
from bigjax.models import transformer  # noqa: E402

_LAYERS = flags.DEFINE_list('layers', ['2', '24'], 'Depths to compile.')
_D_MODEL = flags.DEFINE_integer('d_model', 256, 'Model width.')
_HEADS = flags.DEFINE_integer('num_heads', 4, 'Attention heads.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Sequences per batch.')
_VOCAB = flags.DEFINE_integer('vocab_size', 1024, 'Vocabulary size.')
_SHARING = flags.DEFINE_enum('cross_layer_sharing', 'none',
                             list(transformer.CROSS_LAYER_SHARING),
                             'Parameter sharing across depth.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')


def train_step(params, opt_state, tokens, *, model, tx):
  """Next-token cross-entropy, its gradient, and one optimiser update."""
  def loss_fn(p):
    logits = model.apply({'params': p}, tokens[:, :-1], train=False)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def measure(num_layers: int) -> dict:
  """Lower and compile times (seconds) of one train step at this depth."""
  model = transformer.DecoderLM(
      vocab_size=_VOCAB.value, d_model=_D_MODEL.value, num_layers=num_layers,
      num_heads=_HEADS.value, mlp_dim=4 * _D_MODEL.value,
      max_len=_SEQ_LEN.value, cross_layer_sharing=_SHARING.value)
  tx = optax.adam(1e-3)
  tokens = jax.ShapeDtypeStruct((_BATCH.value, _SEQ_LEN.value + 1), jnp.int32)
  variables = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0),
      jax.ShapeDtypeStruct((1, _SEQ_LEN.value), jnp.int32))
  params = variables['params']
  opt_state = jax.eval_shape(tx.init, params)
  step = jax.jit(functools.partial(train_step, model=model, tx=tx))
  start = time.perf_counter()
  lowered = step.lower(params, opt_state, tokens)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {'num_layers': num_layers,
          'cross_layer_sharing': _SHARING.value,
          'parameters': param_counts.count_parameters(variables)['unique'],
          'lower_s': lowered_at - start, 'compile_s': done - lowered_at,
          'total_s': done - start}


def main(argv):
  del argv
  records = [measure(int(n)) for n in _LAYERS.value]
  base = records[0]['total_s']
  for r in records:
    r['ratio_to_first'] = r['total_s'] / base
    print(json.dumps(r))
  report.write(records, [
      ('layers', lambda r: str(r['num_layers'])),
      ('parameters', lambda r: f"{r['parameters']:,}"),
      ('lower (s)', lambda r: f"{r['lower_s']:.2f}"),
      ('compile (s)', lambda r: f"{r['compile_s']:.2f}"),
      ('total (s)', lambda r: f"{r['total_s']:.2f}"),
      ('ratio', lambda r: f"{r['ratio_to_first']:.2f}x"),
  ], json_path=_JSON.value,
      title=(f'DecoderLM d_model={_D_MODEL.value}, {_HEADS.value} heads, '
             f'seq {_SEQ_LEN.value}, batch {_BATCH.value}, '
             f'backend {jax.default_backend()}'))

if __name__ == '__main__':
  app.run(main)
