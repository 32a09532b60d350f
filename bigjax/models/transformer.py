"""Pre-LayerNorm Transformers: blocks, depth by `nn.scan`, and four models.

Depth is always one `LayerStack`: an `nn.scan` over layers, so a 24-layer
stack compiles one block, not 24. Its `cross_layer_sharing` says which
parameters the layers share (ALBERT, Lan et al. 2019):
  * 'none': every layer has its own; they are stacked on a leading 'layers'
    axis ([num_layers, ...] under `<stack>/layers/...`).
  * 'all': one block applied num_layers times (also the Universal
    Transformer's depth recurrence); its parameters, under
    `<stack>/layers/...`, count num_layers times as effective parameters.
  * 'attention' / 'ffn': only that sub-layer (with its LayerNorm) is shared.
    The parameters come in two groups: `<stack>/shared/...` (one copy,
    counted num_layers times) and `<stack>/layers/...` (stacked).

Models: `TransformerEncoder` (sequence classifier), `DecoderLM` (causal
language model), `EncoderDecoder` (sequence to sequence) and `ViT` (image
classifier, in `bigjax.models.MODELS` as 'vit').

Decoding (`bigjax.decoding`): `DecoderLM` and `EncoderDecoder` take
`decode=True` with the 'cache' collection mutable. Each self-attention layer
then keeps its keys and values (`attention.MultiHeadAttention`), the model
keeps the slots and positions used so far (`decode_masks`), and tokens
continue the cached sequence, so one new token costs one layer pass plus
the attention read over the cache. Every cache array is batch-first, for
beam search to reorder.
"""

import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
from flax.core import meta

from bigjax.models import activations
from bigjax.models import attention
from bigjax.models import axes
from bigjax.models import dense
from bigjax.models import layer_norm
from bigjax.models import param_counts
from bigjax.models import positional as positional_lib

CROSS_LAYER_SHARING = ('none', 'all', 'attention', 'ffn')
# Activation rematerialisation of each layer in the backward pass:
#   'none': keep every activation the backward pass reads;
#   'full': keep only each layer's input, recompute the rest (activation
#     memory of one layer instead of all, about one more forward pass);
#   'save_dots': keep the products with weight matrices (projections, MLP),
#     recompute the cheap rest (norms, activations, attention scores, which
#     are the O(length^2) part).
REMAT = ('none', 'full', 'save_dots')
_REMAT_POLICIES = {
    'full': None,
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
_LAYERS_AXIS = {nn.PARTITION_NAME: 'layers'}


def _layer_norm(name):
  return layer_norm.LayerNorm(name=name)


class MLP(nn.Module):
  """Position-wise feed-forward: Dense(mlp_dim) - GELU - dropout - Dense(embed).

  Attributes:
    mlp_dim: hidden width.
    dropout_rate: dropout on the hidden activations.
  """
  mlp_dim: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    """[batch, length, embed] -> [batch, length, embed]."""
    h = nn.Dense(self.mlp_dim, name='wi', dot_general=dense.dot_general,
                 kernel_init=axes.logical(nn.initializers.xavier_uniform(),
                                      ('embed', 'mlp')),
                 bias_init=axes.logical(nn.initializers.zeros_init(), ('mlp',)))(x)
    h = nn.Dropout(self.dropout_rate,
                   deterministic=not train)(activations.gelu(h))
    return nn.Dense(x.shape[-1], name='wo', dot_general=dense.dot_general,
                    kernel_init=axes.logical(nn.initializers.xavier_uniform(),
                                         ('mlp', 'embed')),
                    bias_init=axes.logical(nn.initializers.zeros_init(),
                                       ('embed',)))(h)


class _BlockFields(nn.Module):
  """Hyperparameters shared by EncoderBlock and DecoderBlock.

  Attributes:
    num_heads, num_kv_heads, head_dim: see attention.MultiHeadAttention.
    mlp_dim: hidden width of the MLP.
    dropout_rate: dropout on each sub-layer's output and the MLP's hidden
      activations.
    attention_dropout_rate: dropout on the attention weights.
    attention_kernel: see attention.dot_product_attention.
    use_rope: rotary positions in self-attention (needs `positions`).
  """
  num_heads: int = 4
  mlp_dim: int = 512
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_kernel: str = 'einsum'
  use_rope: bool = False

  def _attention(self, name, *, use_rope):
    return attention.MultiHeadAttention(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, dropout_rate=self.attention_dropout_rate,
        kernel=self.attention_kernel, use_rope=use_rope, name=name)

  def _residual(self, x, h, *, train):
    return x + nn.Dropout(self.dropout_rate, deterministic=not train)(h)

  def _mlp(self, x, *, train):
    h = _layer_norm('mlp_norm')(x)
    h = MLP(self.mlp_dim, self.dropout_rate, name='mlp')(h, train=train)
    return self._residual(x, h, train=train)


class EncoderBlock(_BlockFields):
  """x + SelfAttention(LN(x)), then x + MLP(LN(x)): [batch, length, embed]."""
  # Submodules of each group that cross_layer_sharing can share.
  SHARING_GROUPS = {'attention': ('attention_norm', 'attention'),
                    'ffn': ('mlp_norm', 'mlp')}

  @nn.compact
  def __call__(self, x, *, train: bool, valid=None, positions=None):
    """x [batch, length, embed] -> same.

    Args:
      valid: bool [batch, length], False at padding: padded tokens are not
        attended to and their own attention outputs are zero.
      positions: int [length] or [batch, length], for RoPE.
    """
    h = _layer_norm('attention_norm')(x)
    h = self._attention('attention', use_rope=self.use_rope)(
        h, q_valid=valid, kv_valid=valid, train=train, positions=positions)
    x = self._residual(x, h, train=train)
    return self._mlp(x, train=train)


class DecoderBlock(_BlockFields):
  """Causal self-attention, optional cross-attention, MLP; all pre-LN.

  Attributes:
    cross_attention: attend to an encoder's output (`context`) too.
  """
  cross_attention: bool = False
  SHARING_GROUPS = {
      'attention': ('self_attention_norm', 'self_attention',
                    'cross_attention_norm', 'cross_attention'),
      'ffn': ('mlp_norm', 'mlp')}

  @nn.compact
  def __call__(self, x, *, train: bool, valid=None, positions=None,
               context=None, context_valid=None,
               decode_masks: Optional[attention.DecodeMasks] = None):
    """x [batch, length, embed] -> same.

    Args:
      valid: bool [batch, length], False at padding.
      positions: int [length] or [batch, length], for RoPE (in decode mode
        each row's own positions [batch, length]).
      context: [batch, src_length, embed], needed with cross_attention
        (in decode mode only on the first call; later calls reuse the
        cross-attention keys and values cached then).
      context_valid: bool [batch, src_length], False at source padding.
      decode_masks: decode mode: continue the cached sequence (see
        `decode_masks` and attention.MultiHeadAttention).
    """
    decode = decode_masks is not None
    h = _layer_norm('self_attention_norm')(x)
    h = self._attention('self_attention', use_rope=self.use_rope)(
        h, is_causal=True, q_valid=valid, kv_valid=valid, train=train,
        positions=positions, decode_masks=decode_masks)
    x = self._residual(x, h, train=train)
    if self.cross_attention:
      h = _layer_norm('cross_attention_norm')(x)
      # No RoPE across sequences: offsets between a target and a source
      # position mean nothing.
      h = self._attention('cross_attention', use_rope=False)(
          h, context, q_valid=valid, kv_valid=context_valid, train=train,
          decode=decode, kv_from_cache=decode and context is None)
      x = self._residual(x, h, train=train)
    return self._mlp(x, train=train)


class _SharedUses(nn.Module):
  """Declares, at `<stack>/shared`, that the shared group is applied `times`."""
  times: int

  @nn.compact
  def __call__(self):
    param_counts.declare_uses(self, self.times)


class LayerStack(nn.Module):
  """`block` applied num_layers times, as one `nn.scan` over depth.

  The scan runs over a layer index; parameters are stacked along a leading
  'layers' axis (variable_axes) or broadcast to every layer
  (variable_broadcast) depending on `cross_layer_sharing`, and the
  'intermediates' collection is stacked, so attention weights sown by the
  blocks come out as [num_layers, batch, heads, q, k]. Build it with
  `layer_stack(...)`, which adds the parameter regrouping that partial
  sharing needs.

  Decoding (decode=True) unrolls the depth instead: layer i runs with its
  slice of the parameters and keeps its own cache, 'cache'/'layer{i}' (one
  per layer even when parameters are shared: each layer sees different
  inputs). Carried through a scan, every step would copy every layer's
  whole cache in and out; as separate arrays each step writes one position
  of each in place, so a step's cost grows with the prefix only through the
  attention read.

  Attributes:
    block: makes one block, e.g. functools.partial(EncoderBlock, ...); called
      with name='layers'.
    num_layers: depth.
    cross_layer_sharing: 'none', 'all', 'attention' or 'ffn' (module doc).
    step_encoding: add a sinusoidal encoding of the layer index before each
      layer (the Universal Transformer's timestep embedding; no parameters).
    remat: 'none', 'full' or 'save_dots': what each layer keeps for the
      backward pass (`REMAT`).
    scan_unroll: layers per iteration of the scan over depth (`nn.scan`'s
      unroll); num_layers unrolls it whole: slower to compile, and XLA then
      indexes the stacked parameters and saved activations statically.
  """
  block: Callable[..., nn.Module]
  num_layers: int
  cross_layer_sharing: str = 'none'
  step_encoding: bool = False
  remat: str = 'none'
  scan_unroll: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool, decode: bool = False, **inputs):
    """x [batch, length, embed] -> same; `inputs` go to every block.

    decode=True: the decode-mode stack (class doc); `inputs` then carry
    the blocks' decode arguments (DecoderBlock's decode_masks).
    """
    sharing, step_encoding = self.cross_layer_sharing, self.step_encoding
    if sharing not in CROSS_LAYER_SHARING:
      raise ValueError(f'cross_layer_sharing={sharing!r}; use one of '
                       f'{CROSS_LAYER_SHARING}')
    if self.remat not in REMAT:
      raise ValueError(f'remat={self.remat!r}; use one of {REMAT}')
    if sharing == 'all':
      # Outside the scan, so the marker is stored once.
      param_counts.declare_uses(self, self.num_layers)
    elif sharing != 'none':
      _SharedUses(self.num_layers, name='shared')()

    if decode:
      return self._decode(x, train=train, inputs=inputs)

    def body(block, x, step, inputs):
      if step_encoding:
        x = x + positional_lib.sinusoidal_encoding(step, x.shape[-1]).astype(
            x.dtype)
      return block(x, train=train, **inputs), None

    if self.remat != 'none':
      # The scan already stops CSE.
      body = nn.remat(body, prevent_cse=False,
                      policy=_REMAT_POLICIES[self.remat])
    stacked = sharing != 'all'
    scan = nn.scan(
        body,
        variable_axes=({'params': 0, 'intermediates': 0} if stacked
                       else {'intermediates': 0}),
        variable_broadcast=False if stacked else 'params',
        split_rngs={'params': stacked, 'dropout': True},
        in_axes=(0, nn.broadcast),
        length=self.num_layers, unroll=self.scan_unroll,
        metadata_params=_LAYERS_AXIS)
    x, _ = scan(self.block(name='layers'), x, jnp.arange(self.num_layers),
                inputs)
    return x

  def _decode(self, x, *, train, inputs):
    """The decode-mode stack: layers unrolled, one cache each (class doc)."""
    params = self.variables.get('params', {}).get('layers')
    if params is None:
      raise ValueError('decode=True needs initialised parameters; create '
                       'them with model.init first')
    block = self.block(parent=None)
    for i in range(self.num_layers):
      if self.step_encoding:
        x = x + positional_lib.sinusoidal_encoding(i, x.shape[-1]).astype(
            x.dtype)
      layer = {'params': params if self.cross_layer_sharing == 'all'
               else jax.tree.map(lambda p, i=i: p[i], params)}
      cache = self.get_variable('cache', f'layer{i}')
      if cache is not None:  # Absent only in the call that creates it.
        layer['cache'] = cache
      x, state = block.apply(layer, x, train=train, mutable=['cache'],
                             **inputs)
      self.put_variable('cache', f'layer{i}', state['cache'])
    return x


def _tile_shared(variables, *, num_layers):
  """Stored layout -> the scan's view: `shared` copied into every layer."""
  params = dict(variables.get('params', {}))
  shared = params.pop('shared', None)
  if shared is None:  # Nothing initialised yet.
    return variables
  layers = dict(params.get('layers', {}))
  for key, tree in shared.items():
    # broadcast_to's gradient sums over layers: the shared copy gets the
    # total gradient of all its uses.
    tiled = jax.tree.map(
        lambda p: jnp.broadcast_to(p, (num_layers,) + p.shape), tree)
    layers[key] = meta.add_axis(tiled, 0, _LAYERS_AXIS)
  return {**variables, 'params': {**params, 'layers': layers}}


def _untile_shared(variables, *, keys):
  """The scan's view -> stored layout: layer 0's copy of `keys` to `shared`.

  Only runs at init (params are immutable in apply); the other layers'
  copies of the shared sub-layers are fresh inits that are dropped.
  """
  params = dict(variables.get('params', {}))
  layers = dict(params.get('layers', {}))
  shared = {}
  for key in keys:
    if key in layers:
      tree = meta.remove_axis(layers.pop(key), 0, _LAYERS_AXIS)
      shared[key] = jax.tree.map(lambda p: p[0], tree)
  if not shared:
    return variables
  return {**variables, 'params': {**params, 'layers': layers,
                                  'shared': shared}}


@functools.lru_cache(maxsize=None)
def _partly_shared_stack(keys: tuple[str, ...], num_layers: int):
  """LayerStack storing `keys` once under `shared` and the rest stacked."""
  return nn.map_variables(
      LayerStack, 'params',
      trans_in_fn=functools.partial(_tile_shared, num_layers=num_layers),
      trans_out_fn=functools.partial(_untile_shared, keys=keys),
      # Not init=True: that first runs the stack on the stored (untiled)
      # layout whenever any collection is mutable; _tile_shared handles the
      # empty variables of init itself.
      mutable=True)


def layer_stack(block, num_layers: int, cross_layer_sharing: str = 'none', *,
                name: str, **kwargs) -> LayerStack:
  """A LayerStack of `block` (a partial of a block class) named `name`."""
  cls = LayerStack
  if cross_layer_sharing in ('attention', 'ffn'):
    block_cls = getattr(block, 'func', block)
    cls = _partly_shared_stack(
        block_cls.SHARING_GROUPS[cross_layer_sharing], num_layers)
  return cls(block=block, num_layers=num_layers,
             cross_layer_sharing=cross_layer_sharing, name=name, **kwargs)


class TokenEmbedding(nn.Module):
  """Token ids -> vectors, and vectors -> logits with the same table.

  With `embedding_dim` set (ALBERT's factorisation), the table is [vocab,
  embedding_dim] and a projection [embedding_dim, features] maps it to the
  model width: vocab * E + E * d parameters instead of vocab * d.

  Attributes:
    vocab_size: number of token ids.
    features: model width d.
    embedding_dim: E, or None for no factorisation.
  """
  vocab_size: int
  features: int
  embedding_dim: Optional[int] = None

  def setup(self):
    dim = self.embedding_dim or self.features
    self.embedding = self.param(
        'embedding', axes.logical(nn.initializers.normal(stddev=0.02),
                              ('vocab', 'embed' if dim == self.features
                               else None)),
        (self.vocab_size, dim))
    if self.embedding_dim:
      self.projection = self.param(
          'projection', axes.logical(nn.initializers.lecun_normal(),
                                 (None, 'embed')),
          (self.embedding_dim, self.features))

  def __call__(self, tokens):
    """int [...] -> [..., features]."""
    x = jnp.take(self.embedding, tokens, axis=0)
    return x @ self.projection if self.embedding_dim else x

  def attend(self, h):
    """Tied output layer: [..., features] -> logits [..., vocab_size].

    logits = h @ embedding^T, through the projection's transpose when the
    embedding is factorised.
    """
    if self.embedding_dim:
      h = h @ self.projection.T
    return h @ self.embedding.T


class _TransformerFields(nn.Module):
  """Hyperparameters every Transformer model here takes (config.model keys).

  Attributes:
    d_model: model width.
    num_layers: depth (of each stack, for EncoderDecoder).
    num_heads, num_kv_heads, head_dim: see attention.MultiHeadAttention.
    mlp_dim: hidden width of the MLPs.
    dropout_rate: dropout on embeddings, sub-layer outputs and MLP hiddens.
    attention_dropout_rate: dropout on attention weights ('einsum' only).
    attention_kernel: 'einsum', 'xla', 'cudnn', 'chunked' or 'blocked' (the
      fastest on CPUs); see attention.dot_product_attention.
    positional: 'learned', 'sinusoidal' or 'rope' (ViT: not 'rope').
    cross_layer_sharing: 'none', 'all', 'attention' or 'ffn'.
    step_encoding: per-layer timestep encoding (Universal Transformer).
    remat: 'none', 'full' or 'save_dots' (`REMAT`: what each layer keeps
      for the backward pass).
    scan_unroll: layers per iteration of the scan over depth (LayerStack).
  """
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  mlp_dim: int = 512
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_kernel: str = 'einsum'
  positional: str = 'learned'
  cross_layer_sharing: str = 'none'
  step_encoding: bool = False
  remat: str = 'none'
  scan_unroll: int = 1

  def _stack(self, block_cls, name, **block_kwargs):
    block = functools.partial(
        block_cls, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_kernel=self.attention_kernel,
        use_rope=self.positional == 'rope', **block_kwargs)
    return layer_stack(block, self.num_layers, self.cross_layer_sharing,
                       step_encoding=self.step_encoding, remat=self.remat,
                       scan_unroll=self.scan_unroll, name=name)

  def _add_positions(self, x, positions, *, max_len, name):
    """x [batch, length, d] plus learned or sinusoidal position codes."""
    if self.positional == 'learned':
      return x + positional_lib.LearnedPositionalEmbedding(
          max_len, x.shape[-1], name=name)(positions)
    if self.positional == 'sinusoidal':
      return x + positional_lib.sinusoidal_encoding(
          positions, x.shape[-1]).astype(x.dtype)
    if self.positional == 'rope':  # Applied to queries and keys instead.
      return x
    raise ValueError(f'positional={self.positional!r}; use learned, '
                     'sinusoidal or rope')

  def _dropout(self, x, *, train):
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


def decode_masks(module, tokens, valid=None):
  """Positions [batch, n] and attention.DecodeMasks for a decode call.

  Beside every layer's keys and values, a decoding model's cache holds
    'slot' int32 [batch] (equal across the batch): cache slots used so far;
    'length' int32 [batch]: each row's real tokens so far (its next position);
    'key_valid' bool [batch, cache_len]: the slots that hold real tokens;
  all created (zeros) by the first decode call, whose length sets
  cache_len. `valid` (bool [batch, n], True on a prefix of each row; None:
  all n) marks the real tokens of a right-padded ragged prompt: its padding
  takes cache slots but no positions, and no query ever sees it, so every
  row continues from its own last token while the batch shares one slot
  counter (and each layer writes with one dynamic_update_slice).
  """
  batch, n = tokens.shape
  if valid is None:
    valid = jnp.ones((batch, n), bool)
  slot = module.variable('cache', 'slot', jnp.zeros, (batch,), jnp.int32)
  length = module.variable('cache', 'length', jnp.zeros, (batch,), jnp.int32)
  key_valid = module.variable('cache', 'key_valid', jnp.zeros, (batch, n),
                              bool)
  start = slot.value[0]
  positions = length.value[:, None] + jnp.arange(n)
  key_valid.value = lax.dynamic_update_slice_in_dim(key_valid.value, valid,
                                                    start, axis=1)
  causal = (jnp.arange(key_valid.value.shape[1])
            <= start + jnp.arange(n)[:, None])  # [n, cache_len]
  masks = attention.DecodeMasks(slot=start,
                                visible=key_valid.value[:, None] & causal)
  length.value = length.value + jnp.sum(valid, axis=1, dtype=jnp.int32)
  slot.value = slot.value + n
  return positions, masks


def _output_logits(embed, x, *, tie: bool, vocab_size: int):
  if tie:
    return embed.attend(x)
  return nn.Dense(vocab_size, use_bias=False, name='logits',
                  kernel_init=axes.logical(nn.initializers.lecun_normal(),
                                       ('embed', 'vocab')))(x)


class TransformerEncoder(_TransformerFields):
  """Sequence classifier: tokens -> encoder -> pooled -> logits.

  Attributes:
    vocab_size: number of token ids.
    num_classes: size of the output logits.
    max_len: longest sequence (learned positions; +1 for the CLS token).
    pooling: 'mean' over valid tokens, or 'cls' (a learned token prepended).
    embedding_dim: ALBERT factorised embedding size, or None.
  """
  vocab_size: int = 256
  num_classes: int = 2
  max_len: int = 512
  pooling: str = 'mean'
  embedding_dim: Optional[int] = None

  @nn.compact
  def __call__(self, tokens, *, train: bool, valid=None):
    """int [batch, length] (valid: bool [batch, length]) -> [batch, classes]."""
    x = TokenEmbedding(self.vocab_size, self.d_model, self.embedding_dim,
                       name='embed')(tokens)
    if valid is None:
      valid = jnp.ones(tokens.shape, bool)
    if self.pooling == 'cls':
      cls = self.param('cls', axes.logical(nn.initializers.zeros_init(),
                                       (None, None, 'embed')),
                       (1, 1, self.d_model))
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])),
                           x], axis=1)
      valid = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), valid], 1)
    elif self.pooling != 'mean':
      raise ValueError(f'pooling={self.pooling!r}; use mean or cls')
    positions = jnp.arange(x.shape[1])
    x = self._add_positions(x, positions, max_len=self.max_len + 1,
                            name='position_embedding')
    x = self._dropout(x, train=train)
    # positions=None: each layer's RoPE numbers 0..length-1 itself, as a
    # constant of the program (positional.apply_rope).
    x = self._stack(EncoderBlock, 'blocks')(x, train=train, valid=valid,
                                            positions=None)
    x = _layer_norm('final_norm')(x)
    if self.pooling == 'cls':
      pooled = x[:, 0]
    else:
      w = valid[..., None].astype(x.dtype)
      pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    return axes.dense(self.num_classes, ('embed', 'classes'),
                      name='head')(pooled)


class DecoderLM(_TransformerFields):
  """Decoder-only causal language model (GPT-style).

  With `decode=True` (and the 'cache' collection mutable) the tokens
  continue the cached sequence: a prompt in one call, then one token per
  call (`bigjax.decoding`; module doc).

  Attributes:
    vocab_size: number of token ids.
    max_len: longest sequence (learned positions).
    embedding_dim: ALBERT factorised embedding size, or None.
    tie_embeddings: logits through the input embedding's transpose; else a
      separate bias-free Dense 'logits'.
  """
  vocab_size: int = 256
  max_len: int = 512
  embedding_dim: Optional[int] = None
  tie_embeddings: bool = True
  # The task whose inputs this model reads (`bigjax.decoding` builds its
  # decode calls from it).
  TASK = 'language_model'

  @nn.compact
  def __call__(self, tokens, *, train: bool, valid=None, decode: bool = False):
    """int [batch, length] -> logits [batch, length, vocab_size].

    Position t's logits depend on tokens[:, :t+1] only (and, in decode mode,
    on the cached tokens before them). `valid` (bool [batch, length], True on
    a prefix of each row) marks padding; in decode mode it only says how far
    each row's cache advances.
    """
    embed = TokenEmbedding(self.vocab_size, self.d_model, self.embedding_dim,
                           name='embed')
    extra = {}
    if decode:
      positions, extra['decode_masks'] = decode_masks(self, tokens, valid)
      valid = None
    else:
      positions = jnp.arange(tokens.shape[1])
    x = self._add_positions(embed(tokens), positions, max_len=self.max_len,
                            name='position_embedding')
    x = self._dropout(x, train=train)
    # Outside decoding, positions=None: each layer's RoPE numbers
    # 0..length-1 itself, as a constant of the program
    # (positional.apply_rope).
    x = self._stack(DecoderBlock, 'blocks')(
        x, train=train, valid=valid, positions=positions if decode else None,
        decode=decode, **extra)
    x = _layer_norm('final_norm')(x)
    return _output_logits(embed, x, tie=self.tie_embeddings,
                          vocab_size=self.vocab_size)


class EncoderDecoder(_TransformerFields):
  """Sequence-to-sequence Transformer (Vaswani et al. 2017), pre-LN.

  Source and target share one token embedding (and, when tied, the output
  layer). Both stacks have num_layers layers.

  With `decode=True` (and the 'cache' collection mutable) 'tgt' continues
  the cached target. The first decode call passes 'src' (and 'src_valid'):
  the encoder runs and every cross-attention layer caches its keys and
  values; later calls pass only 'tgt' (`bigjax.decoding`).

  Attributes:
    vocab_size: number of token ids (shared by source and target).
    max_len: longest source or target sequence (learned positions).
    embedding_dim: ALBERT factorised embedding size, or None.
    tie_embeddings: logits through the shared embedding's transpose.
  """
  vocab_size: int = 256
  max_len: int = 512
  embedding_dim: Optional[int] = None
  tie_embeddings: bool = True
  TASK = 'seq2seq'  # See DecoderLM.TASK.

  @nn.compact
  def __call__(self, inputs, *, train: bool, decode: bool = False):
    """Target logits given the source and the (shifted) target.

    Args:
      inputs: {'src': int [batch, src_len], 'tgt': int [batch, tgt_len],
        optional 'src_valid': bool [batch, src_len], optional 'tgt_valid':
        bool [batch, tgt_len]}. Position t of 'tgt' predicts token t + 1.
        Decode calls after the first leave out 'src' and 'src_valid'.
      train: enables dropout.
      decode: continue the cached target (class doc).

    Returns:
      logits [batch, tgt_len, vocab_size].
    """
    tgt, src_valid = inputs['tgt'], inputs.get('src_valid')
    tgt_valid = inputs.get('tgt_valid')
    embed = TokenEmbedding(self.vocab_size, self.d_model, self.embedding_dim,
                           name='embed')
    context = None
    if 'src' in inputs:
      src = inputs['src']
      src_pos = jnp.arange(src.shape[1])
      x = self._add_positions(embed(src), src_pos, max_len=self.max_len,
                              name='src_position_embedding')
      x = self._stack(EncoderBlock, 'encoder')(
          self._dropout(x, train=train), train=train, valid=src_valid,
          positions=None)  # 0..length-1, as in DecoderLM.
      context = _layer_norm('encoder_norm')(x)
    elif not decode:
      raise ValueError("EncoderDecoder inputs need 'src' (only decode calls "
                       'after the first may leave it out)')
    extra = {}
    if decode:
      tgt_pos, extra['decode_masks'] = decode_masks(self, tgt, tgt_valid)
      tgt_valid = None
    else:
      tgt_pos = jnp.arange(tgt.shape[1])
    y = self._add_positions(embed(tgt), tgt_pos, max_len=self.max_len,
                            name='tgt_position_embedding')
    y = self._stack(DecoderBlock, 'decoder', cross_attention=True)(
        self._dropout(y, train=train), train=train, valid=tgt_valid,
        positions=tgt_pos if decode else None, context=context,
        context_valid=src_valid,
        decode=decode, **extra)
    y = _layer_norm('decoder_norm')(y)
    return _output_logits(embed, y, tie=self.tie_embeddings,
                          vocab_size=self.vocab_size)


class ViT(_TransformerFields):
  """Vision Transformer (Dosovitskiy et al. 2021), pre-LN.

  Non-overlapping patch_size x patch_size patches are embedded by a strided
  convolution (a Dense on each flattened patch), given positions, optionally
  preceded by a CLS token (which gets no position code), encoded, and pooled.
  Pixels beyond a whole number of patches are dropped.

  Attributes:
    num_classes: size of the output logits.
    patch_size: side of the square patches.
    pooling: 'cls' (the CLS token's output) or 'mean' (over patches).
    positional: 'learned' or 'sinusoidal' (2-D: half the features for the
      row, half for the column).
  """
  num_classes: int = 10
  patch_size: int = 4
  pooling: str = 'cls'

  @nn.compact
  def __call__(self, images, *, train: bool):
    """float [batch, height, width, channels] -> logits [batch, classes]."""
    p = self.patch_size
    x = nn.Conv(self.d_model, (p, p), strides=(p, p), padding='VALID',
                name='patch_embedding',
                kernel_init=axes.logical(nn.initializers.lecun_normal(),
                                     (None, None, None, 'embed')),
                bias_init=axes.logical(nn.initializers.zeros_init(),
                                   ('embed',)))(images)
    b, grid_h, grid_w, d = x.shape
    x = x.reshape(b, grid_h * grid_w, d)
    if self.positional == 'learned':
      x = x + positional_lib.LearnedPositionalEmbedding(
          grid_h * grid_w, d, name='position_embedding')(
              jnp.arange(grid_h * grid_w))
    elif self.positional == 'sinusoidal':
      x = x + positional_lib.sinusoidal_encoding_2d(grid_h, grid_w,
                                                   d).astype(x.dtype)
    else:
      raise ValueError(f'ViT positional={self.positional!r}; use learned or '
                       'sinusoidal')
    if self.pooling == 'cls':
      cls = self.param('cls', axes.logical(nn.initializers.zeros_init(),
                                       (None, None, 'embed')), (1, 1, d))
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    elif self.pooling != 'mean':
      raise ValueError(f'pooling={self.pooling!r}; use cls or mean')
    x = self._dropout(x, train=train)
    x = self._stack(EncoderBlock, 'encoder')(x, train=train)
    x = _layer_norm('encoder_norm')(x)
    pooled = x[:, 0] if self.pooling == 'cls' else x.mean(axis=1)
    return _zero_head(self.num_classes)(pooled)


def _zero_head(num_classes: int) -> nn.Dense:
  """A zero-initialised classifier head named 'head', [embed] -> [classes]:
  every class starts equally likely (big_vision), and a fine-tuned body's
  features are not disturbed by a random projection at the start."""
  return nn.Dense(
      num_classes, name='head',
      kernel_init=axes.logical(nn.initializers.zeros_init(),
                               ('embed', 'classes')),
      bias_init=axes.logical(nn.initializers.zeros_init(), ('classes',)))


class DecoderClassifier(DecoderLM):
  """A decoder-only Transformer read as a sequence classifier.

  Its body has DecoderLM's parameter names ('embed', 'position_embedding',
  'blocks', 'final_norm'), so a language model trained as DecoderLM
  fine-tunes into it through `config.init_from` (every parameter but
  'head/...'). The final hidden states, pooled over the sequence ('mean', or
  'last': the one position that has read every token), feed a fresh
  zero-initialised head; the LM's output layer is not used.

  Attributes (beyond DecoderLM's):
    num_classes: size of the output logits.
    pooling: 'mean' or 'last'.
  """
  num_classes: int = 2
  pooling: str = 'mean'
  TASK = 'text_classification'

  @nn.compact
  def __call__(self, tokens, *, train: bool):
    """int [batch, length] -> logits [batch, num_classes]."""
    if self.pooling not in ('mean', 'last'):
      raise ValueError(f'pooling={self.pooling!r}; use mean or last')
    embed = TokenEmbedding(self.vocab_size, self.d_model, self.embedding_dim,
                           name='embed')
    positions = jnp.arange(tokens.shape[1])
    x = self._add_positions(embed(tokens), positions, max_len=self.max_len,
                            name='position_embedding')
    x = self._dropout(x, train=train)
    x = self._stack(DecoderBlock, 'blocks')(x, train=train, valid=None,
                                            positions=positions)
    x = _layer_norm('final_norm')(x)
    pooled = x.mean(axis=1) if self.pooling == 'mean' else x[:, -1]
    return _zero_head(self.num_classes)(pooled)
