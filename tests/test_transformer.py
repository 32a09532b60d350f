"""Transformers: scan over depth equals the unrolled loop, sharing modes store
and count the parameters they should, masks hold, and the models run."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.models import MODELS
from bigjax.models import param_counts
from bigjax.models import positional
from bigjax.models import transformer as tr
from tests.train_utils import adam_losses

D, HEADS, KV_HEADS, MLP, VOCAB, MAX_LEN = 32, 4, 2, 48, 50, 16
HEAD_DIM = D // HEADS


# Everything runs jitted: eager dispatch of a Transformer's many small ops
# costs far more than compiling it once.
def _init(model, *args, **kwargs):
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.PRNGKey(0), *args, **kwargs)


def _random_variables(model, *args, seed=0, **kwargs):
  """{'params': ...} of the right shapes, drawn from N(0, 0.2^2) in NumPy.

  Checks of equivalences and masks hold for any parameters; skipping the
  model's own (compiled) init keeps these tests fast. Random biases and norm
  offsets also exercise terms a fresh init leaves at zero.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.PRNGKey(0), *args, **kwargs)
  rng = np.random.default_rng(seed)
  return {'params': jax.tree.map(
      lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
      nn.unbox(shapes['params']))}


def _apply(model, **static):
  """model.apply, jitted, in eval mode, with `static` keywords bound."""
  return jax.jit(functools.partial(model.apply, train=False, **static))


def _lm(**kwargs):
  fields = dict(vocab_size=VOCAB, d_model=D, num_layers=3, num_heads=HEADS,
                num_kv_heads=KV_HEADS, mlp_dim=MLP, max_len=MAX_LEN)
  return tr.DecoderLM(**{**fields, **kwargs})


# ---- Closed-form parameter counts ------------------------------------------

def attention_params(d=D, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
  query = d * heads * head_dim + heads * head_dim
  key = value = d * kv_heads * head_dim + kv_heads * head_dim
  out = heads * head_dim * d + d
  return query + key + value + out


def mlp_params(d=D, mlp=MLP):
  return d * mlp + mlp + mlp * d + d


NORM = 2 * D
ATTENTION_GROUP = NORM + attention_params()  # What 'attention' shares.
FFN_GROUP = NORM + mlp_params()              # What 'ffn' shares.
BLOCK = ATTENTION_GROUP + FFN_GROUP


@pytest.mark.parametrize('sharing, tie, embedding_dim', [
    ('none', True, None), ('all', True, None), ('attention', True, None),
    ('ffn', True, None), ('none', False, None), ('all', False, 8),
    ('none', True, 8)])
def test_parameter_counts_match_closed_form(sharing, tie, embedding_dim):
  layers = 3
  model = _lm(num_layers=layers, cross_layer_sharing=sharing,
              tie_embeddings=tie, embedding_dim=embedding_dim)
  variables = jax.eval_shape(functools.partial(
      model.init, train=False), jax.random.PRNGKey(0),
                             jnp.zeros((1, 4), jnp.int32))
  counts = param_counts.count_parameters(variables)
  embed = (VOCAB * embedding_dim + embedding_dim * D if embedding_dim
           else VOCAB * D)
  other = embed + MAX_LEN * D + NORM + (0 if tie else D * VOCAB)
  unique_blocks = {'none': layers * BLOCK, 'all': BLOCK,
                   'attention': ATTENTION_GROUP + layers * FFN_GROUP,
                   'ffn': layers * ATTENTION_GROUP + FFN_GROUP}[sharing]
  assert counts['unique/embed'] == embed
  assert counts['unique/blocks'] == unique_blocks
  assert counts['effective/blocks'] == layers * BLOCK
  assert counts['unique'] == other + unique_blocks
  assert counts['effective'] == other + layers * BLOCK


def test_all_sharing_stores_one_block_and_counts_it_twelve_times():
  def counts(sharing):
    model = _lm(num_layers=12, cross_layer_sharing=sharing)
    return param_counts.count_parameters(jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.PRNGKey(0),
        jnp.zeros((1, 4), jnp.int32)))

  none, shared = counts('none'), counts('all')
  assert shared['unique/blocks'] * 12 == none['unique/blocks'] == 12 * BLOCK
  assert shared['effective/blocks'] == 12 * shared['unique/blocks']
  assert shared['effective'] == none['effective'] == none['unique']


def test_partial_sharing_stores_two_groups():
  variables = jax.eval_shape(
      functools.partial(_lm(cross_layer_sharing='attention').init,
                        train=False),
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  blocks = nn.unbox(variables['params'])['blocks']
  assert set(blocks) == {'shared', 'layers'}
  assert set(blocks['shared']) == {'self_attention_norm', 'self_attention'}
  assert blocks['shared']['self_attention']['query']['kernel'].shape == (
      D, HEADS, HEAD_DIM)
  assert blocks['layers']['mlp']['wi']['kernel'].shape == (3, D, MLP)
  # Stacked parameters carry the 'layers' logical axis first.
  spec = nn.get_partition_spec(variables['params'])['blocks']
  assert spec['layers']['mlp']['wi']['kernel'] == jax.sharding.PartitionSpec(
      'layers', 'embed', 'mlp')
  assert spec['shared']['self_attention']['query']['kernel'] == (
      jax.sharding.PartitionSpec('embed', 'heads', 'kv'))


# ---- Scan over depth equals the unrolled loop ------------------------------

def _unrolled(block, params, sharing, x, num_layers, *, step_encoding=False,
              **inputs):
  """Applies each layer's slice of the stacked parameters in a Python loop."""
  for layer in range(num_layers):
    if sharing == 'all':
      layer_params = params['layers']
    else:
      layer_params = jax.tree.map(lambda p: p[layer], params['layers'])
      layer_params.update(params.get('shared', {}))
    if step_encoding:
      x = x + positional.sinusoidal_encoding(layer, x.shape[-1])
    x = block.apply({'params': layer_params}, x, train=False, **inputs)
  return x


BLOCK_KWARGS = dict(num_heads=HEADS, num_kv_heads=KV_HEADS, mlp_dim=MLP)


@pytest.mark.parametrize(
    'sharing, cross, step_encoding, remat, unroll, with_grads', [
        ('none', False, False, 'none', 1, False),
        ('all', False, True, 'full', 1, True),
        ('ffn', True, False, 'none', 1, False),
        ('attention', False, False, 'none', 1, True),
        ('none', True, False, 'save_dots', 1, True),
        ('none', False, False, 'none', 2, True)])
def test_scan_equals_unrolled_loop(sharing, cross, step_encoding, remat,
                                   unroll, with_grads):
  """Outputs, and (where compiled: it is slow) gradients: a shared parameter's
  gradient is the sum over the layers that use it, and rematerialisation and
  the scan's unroll (2 of 3 layers: a remainder) change nothing but speed and
  memory."""
  layers = 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, D)).astype(np.float32)
  valid = np.array([[1] * 6, [1, 1, 1, 1, 0, 0]], bool)
  if cross:
    block_cls = functools.partial(tr.DecoderBlock, cross_attention=True)
    inputs = {'valid': valid,
              'context': rng.normal(size=(2, 4, D)).astype(np.float32),
              'context_valid': np.array([[1, 1, 1, 0], [1] * 4], bool)}
  else:
    block_cls, inputs = tr.EncoderBlock, {'valid': valid}
  block = functools.partial(block_cls, **BLOCK_KWARGS)
  stack = tr.layer_stack(block, layers, sharing, step_encoding=step_encoding,
                         remat=remat, scan_unroll=unroll, name='stack')
  params = _random_variables(stack, x, **inputs)['params']

  def scanned(params):
    return stack.apply({'params': params}, x, train=False, **inputs)

  def unrolled(params):
    return _unrolled(block(), params, sharing, x, layers,
                     step_encoding=step_encoding, **inputs)

  if not with_grads:
    np.testing.assert_allclose(jax.jit(scanned)(params),
                               jax.jit(unrolled)(params), atol=1e-5)
    return
  loss = lambda f: lambda p: jnp.sum(f(p) ** 2)  # noqa: E731
  l_scan, g_scan = jax.jit(jax.value_and_grad(loss(scanned)))(params)
  l_loop, g_loop = jax.jit(jax.value_and_grad(loss(unrolled)))(params)
  np.testing.assert_allclose(l_scan, l_loop, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4,
                                                       rtol=1e-4),
               g_scan, g_loop)


def test_depth_compiles_one_block():
  """The traced program does not grow with depth: one scan of length L."""
  def program(layers):
    model = _lm(num_layers=layers)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.PRNGKey(0), tokens)
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, tokens, train=False))(
        params)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'scan']
    return len(jaxpr.jaxpr.eqns), [e.params['length'] for e in scans]

  (n2, scans2), (n12, scans12) = program(2), program(12)
  assert scans2 == [2] and scans12 == [12]
  assert n2 == n12


# ---- Masks inside the models -----------------------------------------------

@pytest.mark.parametrize('kernel, positional_kind, sharing', [
    ('einsum', 'learned', 'none'), ('chunked', 'rope', 'all'),
    ('xla', 'sinusoidal', 'ffn')])
def test_decoder_is_causal(kernel, positional_kind, sharing):
  model = _lm(attention_kernel=kernel, positional=positional_kind,
              cross_layer_sharing=sharing)
  tokens = jnp.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  params, apply = _random_variables(model, tokens), _apply(model)
  logits = apply(params, tokens)
  assert logits.shape == (1, 8, VOCAB)
  t = 4
  changed = tokens.at[:, t + 1:].set(jnp.array([7, 7, 7]))
  logits2 = apply(params, changed)
  np.testing.assert_allclose(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-5)
  assert not np.allclose(logits2[:, t + 1:], logits[:, t + 1:], atol=1e-3)


def test_encoder_outputs_at_valid_positions_ignore_padding():
  block = functools.partial(tr.EncoderBlock, **BLOCK_KWARGS)
  stack = tr.layer_stack(block, 2, name='stack')
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 6, D)).astype(np.float32)
  valid = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  params, apply = _random_variables(stack, x, valid=valid), _apply(stack)
  out = apply(params, x, valid=valid)
  noise = np.where(valid[..., None], 0, rng.normal(size=x.shape) * 10)
  out2 = apply(params, x + noise.astype(np.float32), valid=valid)
  np.testing.assert_allclose(np.asarray(out2)[valid], np.asarray(out)[valid],
                             atol=1e-5)

  classifier = tr.TransformerEncoder(
      vocab_size=VOCAB, num_classes=3, d_model=D, num_layers=2,
      num_heads=HEADS, mlp_dim=MLP, max_len=MAX_LEN, pooling='cls',
      embedding_dim=8)
  tokens = jnp.array([[5, 6, 7, 8, 0, 0], [9, 8, 7, 0, 0, 0]])
  params = _random_variables(classifier, tokens, valid=valid)
  apply = _apply(classifier)
  logits = apply(params, tokens, valid=valid)
  assert logits.shape == (2, 3)
  other = jnp.where(valid, tokens, 42)
  np.testing.assert_allclose(apply(params, other, valid=valid), logits,
                             atol=1e-5)


def test_attention_weights_are_captured_per_layer():
  tokens = jnp.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]])
  for sharing in ('none', 'all', 'attention'):
    model = _lm(cross_layer_sharing=sharing)
    params = _random_variables(model, tokens)['params']
    _, state = _apply(model, mutable=['intermediates'])(
        {'params': params}, tokens)
    (w,) = state['intermediates']['blocks']['layers']['self_attention'][
        'attention_weights']
    assert w.shape == (3, 2, HEADS, 5, 5)  # [layers, batch, heads, q, k]
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(np.asarray(w), 1) == 0)
    # Layers differ (different inputs, and for 'none' different weights).
    assert not np.allclose(w[0], w[1])


def test_encoder_decoder_shapes_causality_and_source_padding():
  model = tr.EncoderDecoder(vocab_size=VOCAB, d_model=D, num_layers=2,
                            num_heads=HEADS, mlp_dim=MLP, max_len=MAX_LEN,
                            cross_layer_sharing='ffn', tie_embeddings=False)
  inputs = {'src': jnp.array([[4, 5, 6, 0]]), 'tgt': jnp.array([[1, 2, 3]]),
            'src_valid': jnp.array([[1, 1, 1, 0]], bool)}
  params, apply = _random_variables(model, inputs), _apply(model)
  logits = apply(params, inputs)
  assert logits.shape == (1, 3, VOCAB)
  later = dict(inputs, tgt=jnp.array([[1, 2, 9]]))
  np.testing.assert_allclose(apply(params, later)[:, :2], logits[:, :2],
                             atol=1e-5)
  padded = dict(inputs, src=jnp.array([[4, 5, 6, 33]]))
  np.testing.assert_allclose(apply(params, padded), logits, atol=1e-5)
  source = dict(inputs, src=jnp.array([[4, 5, 7, 0]]))
  assert not np.allclose(apply(params, source), logits, atol=1e-3)


# ---- ViT -------------------------------------------------------------------

def test_vit_is_registered_and_gives_class_logits():
  assert MODELS['vit'] is tr.ViT
  images = jnp.ones((3, 28, 28, 1))
  for kwargs in ({'pooling': 'cls', 'positional': 'learned'},
                 {'pooling': 'mean', 'positional': 'sinusoidal',
                  'cross_layer_sharing': 'all'}):
    model = tr.ViT(num_classes=10, patch_size=7, d_model=D, num_layers=2,
                   num_heads=HEADS, mlp_dim=MLP, **kwargs)
    logits = _apply(model)(_random_variables(model, images), images)
    assert logits.shape == (3, 10)
  counts = param_counts.count_parameters(jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.PRNGKey(0),
      images))
  assert counts['unique/patch_embedding'] == 7 * 7 * 1 * D + D
  assert counts['effective/encoder'] == 2 * counts['unique/encoder']


def test_vit_loss_falls_on_random_data():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(16, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, size=16)
  model = tr.ViT(num_classes=10, patch_size=7, d_model=D, num_layers=1,
                 num_heads=HEADS, mlp_dim=MLP)
  params = nn.unbox(_init(model, images[:1])['params'])
  losses = adam_losses(model, params, images, labels, steps=15)
  # The zero-initialised head starts every class at 1/10.
  assert losses[0] == pytest.approx(np.log(10), abs=1e-4)
  assert losses[-1] < 0.6 * losses[0]
