"""FLOPs of one training step: written out per model family, and counted.

`train_flops(model, ...)` is the analytic count, the numerator of MFU: the
multiply-adds (x2) of every matmul and convolution in the forward pass and
the backward pass that training needs, for one batch. It reads the
hyperparameters from the model (a bigjax flax module), so defaults a config
leaves out count too. Normalisations, activations, softmax, the loss and the
optimiser are left out (they are memory-bound and a few percent of the
total), as in the usual MFU convention (PaLM, Chowdhery et al. 2022,
appendix B). The backward pass costs twice the forward for a matmul whose
input needs a gradient (gradients for the weights and for the input) and
once otherwise (a layer reading the data: the first convolution, the LSTM's
input rows, the ViT's patch embedding). Attention is counted over all
query-key pairs, masked or not, because every kernel here computes them all.

`jaxpr_flops(fn, *args)` (`bigjax.flops`) counts the same operations in what
JAX traces (dot_general and conv_general_dilated; scan bodies times their
length), a check of the formulas that sees through loops. It counts dead
code too, which XLA then removes: data gradients of the inputs, and a
forward pass that a custom_vjp's backward rule recomputes only to take its
vjp (the CNN's convolutions,
`bigjax.models.cnn.seedwise_conv_general_dilated`), so it is an upper bound.
XLA's own count, `compiled.cost_analysis()['flops']`, is of the optimised
program and includes elementwise work, but counts a while loop's body once
whatever its trip count (checked with jaxlib 0.10.2: a 10-step scan of a
matmul reports the flops of one step), so it undercounts scanned models (the
LSTM's 28 time steps, the Transformers' layers).
"""

from bigjax import flops

# The traced count lives in the library (compute-matched ablations use it).
jaxpr_flops = flops.jaxpr_flops

_GATES = {'elman': 1, 'lstm': 4, 'gru': 3}


def _dense(batch: float, n_in: int, n_out: int, *, input_grad=True) -> float:
  """Training FLOPs of a [batch, n_in] x [n_in, n_out] matmul."""
  return 2.0 * batch * n_in * n_out * (3 if input_grad else 2)


def cnn_flops(m, batch: int, image_shape) -> float:
  """CNN: 'SAME' kxk convolutions, each followed by a 2x2 pool; two denses."""
  h, w, channels = image_shape
  total = 0.0
  for i, features in enumerate(m.features):
    total += _dense(batch * h * w, m.kernel_size ** 2 * channels, features,
                    input_grad=i > 0)
    h, w, channels = h // 2, w // 2, features
  total += _dense(batch, h * w * channels, m.dense_features)
  return total + _dense(batch, m.dense_features, m.num_classes)


def rnn_flops(m, batch: int, image_shape) -> float:
  """RNNClassifier: height steps of width * channels features per layer.

  Each step's gates come from [hidden, input] x [hidden + input, gates *
  hidden]; the input rows of the first layer need no data gradient.
  """
  steps, width, channels = image_shape
  gates, hidden = _GATES[m.cell], m.hidden_size
  directions = 2 if m.bidirectional else 1
  n_in = width * channels
  total = 0.0
  if m.cross_layer_sharing == 'all':  # Projected to the layer width first.
    total += _dense(batch * steps, n_in, directions * hidden, input_grad=False)
    n_in = directions * hidden
  for layer in range(m.num_layers):
    rows = batch * steps * directions
    total += 2.0 * rows * (hidden + n_in) * gates * hidden * 2  # fwd + wgrad
    data_rows = hidden + (n_in if layer > 0 or m.cross_layer_sharing == 'all'
                          else 0)
    total += 2.0 * rows * data_rows * gates * hidden
    n_in = directions * hidden
  return total + _dense(batch, n_in, m.num_classes)


def _encoder_flops(m, batch: int, length: int) -> float:
  """Transformer layers: projections, attention over all pairs, MLP."""
  d = m.d_model
  head_dim = m.head_dim or d // m.num_heads
  kv_heads = m.num_kv_heads or m.num_heads
  tokens = batch * length
  per_layer = (_dense(tokens, d, m.num_heads * head_dim)  # query
               + 2 * _dense(tokens, d, kv_heads * head_dim)  # key, value
               + _dense(tokens, m.num_heads * head_dim, d)  # out
               + _dense(tokens, d, m.mlp_dim) + _dense(tokens, m.mlp_dim, d)
               # q.k and weights.v, each [length, head_dim] x [head_dim,
               # length] per head.
               + 2 * _dense(batch * m.num_heads * length, head_dim, length))
  return m.num_layers * per_layer


def transformer_lm_flops(m, batch: int, seq_len: int) -> float:
  """DecoderLM: embedding (a gather: no FLOPs), layers, output logits."""
  tokens = batch * seq_len
  total = _encoder_flops(m, batch, seq_len) + _dense(tokens, m.d_model,
                                                     m.vocab_size)
  if m.embedding_dim:  # ALBERT factorisation: a projection in and out.
    total += 2 * _dense(tokens, m.embedding_dim, m.d_model)
  return total


def vit_flops(m, batch: int, image_shape) -> float:
  """ViT: patch embedding (reads the data), layers over the patch tokens
  (plus CLS), classifier head."""
  h, w, channels = image_shape
  p = m.patch_size
  patches = (h // p) * (w // p)
  length = patches + (1 if m.pooling == 'cls' else 0)
  return (_dense(batch * patches, p * p * channels, m.d_model,
                 input_grad=False)
          + _encoder_flops(m, batch, length)
          + _dense(batch, m.d_model, m.num_classes))


def train_flops(model, *, batch_size: int, image_shape=(28, 28, 1),
                seq_len: int = 0) -> float:
  """Analytic FLOPs of one training step of `model` (module doc).

  Args:
    model: a bigjax CNN, RNNClassifier, DecoderLM or ViT.
    batch_size: examples (sequences) per step.
    image_shape: (H, W, C) of the image models' inputs.
    seq_len: tokens per sequence of a DecoderLM.
  """
  family = type(model).__name__
  if family == 'CNN':
    return cnn_flops(model, batch_size, image_shape)
  if family == 'RNNClassifier':
    return rnn_flops(model, batch_size, image_shape)
  if family == 'DecoderLM':
    return transformer_lm_flops(model, batch_size, seq_len)
  if family == 'ViT':
    return vit_flops(model, batch_size, image_shape)
  raise ValueError(f'no FLOP formula for {family}')


def xla_flops(compiled) -> float:
  """XLA's flop count of a compiled computation (module doc: loops once)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older jaxlibs: one per program.
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))
