"""PyTorch references of the benchmarked models, for `benchmarks.run`.

Each reference is the same network as a bigjax model, built from that flax
module's hyperparameters (`build(model)`), written the way a PyTorch user
would write it, and is trained by the same recipe: the same loss, Adam/AdamW
with the same hyperparameters and weight-decay mask, the same schedule and
gradient clipping (`Trainer`). Their trainable parameter counts equal ours
(`benchmarks.run` asserts it), and `load_flax_params` copies a bigjax
model's parameters in, so a test checks that both compute the same logits.

Written as a PyTorch user would, where that differs from ours:
  * CNN: NCHW images, flattened in (C, H, W) order (weights are permuted
    on loading);
  * LSTM: `nn.LSTM` (its input projection for all time steps is one matmul).
    It has two bias vectors per gate, ours one: its `bias_hh` is held at
    zero and not trained, so the trainable parameters are ours;
  * Transformer LM: one fused query/key/value Linear (nanoGPT) and
    `F.scaled_dot_product_attention` (PyTorch's fused attention) with RoPE,
    pre-LayerNorm (eps 1e-6, flax's), tanh-approximated GELU (flax's
    `nn.gelu` default), tied input/output embeddings.

torch is never a bigjax dependency: `benchmarks.run` imports this module only
when torch is importable.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default.


def _unsupported(m, **wanted) -> None:
  """Raises for hyperparameters the references do not implement."""
  for key, allowed in wanted.items():
    value = getattr(m, key)
    if value not in allowed:
      raise NotImplementedError(
          f'torch reference of {type(m).__name__}: {key}={value!r} is not '
          f'implemented (only {allowed})')


class CNN(nn.Module):
  """bigjax.models.cnn.CNN: [conv + ReLU + 2x2 pool] per feature count,
  dense + ReLU, dense; dropout on the flattened and the hidden features."""

  def __init__(self, m, image_shape):
    super().__init__()
    h, w, channels = image_shape
    convs = []
    for features in m.features:
      convs.append(nn.Conv2d(channels, features, m.kernel_size,
                             padding='same'))
      h, w, channels = h // 2, w // 2, features
    self.convs = nn.ModuleList(convs)
    self.pool = F.max_pool2d if m.pooling == 'max' else F.avg_pool2d
    self.feature_shape = (h, w, channels)
    self.hidden = nn.Linear(h * w * channels, m.dense_features)
    self.head = nn.Linear(m.dense_features, m.num_classes)
    self.dropout = nn.Dropout(m.dropout_rate)

  def forward(self, x):
    """float [batch, channels, H, W] -> logits [batch, classes]."""
    for conv in self.convs:
      x = self.pool(F.relu(conv(x)), 2)
    x = self.dropout(x.flatten(1))
    return self.head(self.dropout(F.relu(self.hidden(x))))

  def load_flax(self, p):
    for i, conv in enumerate(self.convs):
      _copy(conv.weight, p[f'conv{i}']['kernel'].transpose(3, 2, 0, 1))
      _copy(conv.bias, p[f'conv{i}']['bias'])
    # Ours flattens (H, W, C), this (C, H, W): permute the rows.
    kernel = p['hidden']['kernel'].reshape(*self.feature_shape, -1)
    _copy(self.hidden.weight,
          kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1]).T)
    _copy(self.hidden.bias, p['hidden']['bias'])
    _copy_dense(self.head, p['head'])


class LSTMClassifier(nn.Module):
  """bigjax.models.recurrent.RNNClassifier with cell='lstm': the image read
  row by row, the top layer's last output (or mean), dropout, a dense head."""

  def __init__(self, m, image_shape):
    super().__init__()
    _unsupported(m, cell=('lstm',), cross_layer_sharing=('none',))
    h, w, channels = image_shape
    self.hidden_size, self.pooling = m.hidden_size, m.pooling
    self.bidirectional = m.bidirectional
    self.lstm = nn.LSTM(w * channels, m.hidden_size, m.num_layers,
                        batch_first=True, bidirectional=m.bidirectional,
                        dropout=m.dropout_rate if m.num_layers > 1 else 0.0)
    for name, param in self.lstm.named_parameters():
      if name.startswith('bias_hh'):  # One bias per gate, as ours.
        nn.init.zeros_(param)
        param.requires_grad_(False)
    directions = 2 if m.bidirectional else 1
    self.dropout = nn.Dropout(m.dropout_rate)
    self.head = nn.Linear(directions * m.hidden_size, m.num_classes)

  def forward(self, x):
    """float [batch, H, W * C] rows -> logits [batch, classes]."""
    ys, _ = self.lstm(x)
    if self.pooling == 'mean':
      features = ys.mean(1)
    elif self.bidirectional:  # Forward after the last row, backward the first.
      n = self.hidden_size
      features = torch.cat([ys[:, -1, :n], ys[:, 0, n:]], -1)
    else:
      features = ys[:, -1]
    return self.head(self.dropout(features))

  def load_flax(self, p):
    n = self.hidden_size
    for layer in range(self.lstm.num_layers):
      for direction, suffix in (('forward', ''), ('backward', '_reverse')):
        if direction == 'backward' and not self.bidirectional:
          continue
        cell = p['rnn'][f'layer{layer}'][direction]['cell']
        # Rows: h first, then x; columns: gates i, f, g, o (torch's order).
        _copy(getattr(self.lstm, f'weight_hh_l{layer}{suffix}'),
              cell['kernel'][:n].T)
        _copy(getattr(self.lstm, f'weight_ih_l{layer}{suffix}'),
              cell['kernel'][n:].T)
        _copy(getattr(self.lstm, f'bias_ih_l{layer}{suffix}'), cell['bias'])
    _copy_dense(self.head, p['head'])


def _rope(x, cos, sin):
  """bigjax.models.positional.apply_rope: x [b, t, heads, d], halves rotated."""
  x1, x2 = x.chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class _Block(nn.Module):
  """Pre-LN decoder block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, m):
    super().__init__()
    d = m.d_model
    self.num_heads = m.num_heads
    self.attention_norm = nn.LayerNorm(d, eps=_LAYER_NORM_EPS)
    self.qkv = nn.Linear(d, 3 * d)
    self.out = nn.Linear(d, d)
    self.mlp_norm = nn.LayerNorm(d, eps=_LAYER_NORM_EPS)
    self.wi = nn.Linear(d, m.mlp_dim)
    self.wo = nn.Linear(m.mlp_dim, d)
    self.dropout = nn.Dropout(m.dropout_rate)

  def forward(self, x, cos, sin):
    b, t, d = x.shape
    qkv = self.qkv(self.attention_norm(x)).view(b, t, 3, self.num_heads, -1)
    q, k, v = qkv.unbind(2)  # [b, t, heads, head_dim]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True)
    x = x + self.dropout(self.out(y.transpose(1, 2).reshape(b, t, d)))
    h = self.dropout(F.gelu(self.wi(self.mlp_norm(x)), approximate='tanh'))
    return x + self.dropout(self.wo(h))


class GPT(nn.Module):
  """bigjax.models.transformer.DecoderLM with RoPE and tied embeddings."""

  def __init__(self, m, seq_len: int):
    super().__init__()
    _unsupported(m, positional=('rope',), tie_embeddings=(True,),
                 cross_layer_sharing=('none',), num_kv_heads=(None,),
                 head_dim=(None,), embedding_dim=(None,),
                 attention_dropout_rate=(0.0,), step_encoding=(False,))
    self.embed = nn.Embedding(m.vocab_size, m.d_model)
    self.blocks = nn.ModuleList(_Block(m) for _ in range(m.num_layers))
    self.final_norm = nn.LayerNorm(m.d_model, eps=_LAYER_NORM_EPS)
    self.dropout = nn.Dropout(m.dropout_rate)
    half = m.d_model // m.num_heads // 2
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32),
                         1e4 ** (-torch.arange(half, dtype=torch.float32)
                                 / half))
    self.register_buffer('cos', angles.cos()[:, None, :], persistent=False)
    self.register_buffer('sin', angles.sin()[:, None, :], persistent=False)

  def forward(self, tokens):
    """int64 [batch, length] -> logits [batch, length, vocab]."""
    t = tokens.shape[1]
    x = self.dropout(self.embed(tokens))
    for block in self.blocks:
      x = block(x, self.cos[:t], self.sin[:t])
    return F.linear(self.final_norm(x), self.embed.weight)

  def load_flax(self, p):
    _copy(self.embed.weight, p['embed']['embedding'])
    layers = p['blocks']['layers']
    attention = layers['self_attention']
    for i, block in enumerate(self.blocks):
      _copy_norm(block.attention_norm, layers['self_attention_norm'], i)
      _copy_norm(block.mlp_norm, layers['mlp_norm'], i)
      _copy(block.qkv.weight, np.concatenate([
          attention[n]['kernel'][i].reshape(block.qkv.in_features, -1)
          for n in ('query', 'key', 'value')], 1).T)
      _copy(block.qkv.bias, np.concatenate([
          attention[n]['bias'][i].reshape(-1)
          for n in ('query', 'key', 'value')]))
      _copy(block.out.weight,
            attention['out']['kernel'][i].reshape(-1, block.out.out_features).T)
      _copy(block.out.bias, attention['out']['bias'][i])
      for name in ('wi', 'wo'):
        _copy(getattr(block, name).weight, layers['mlp'][name]['kernel'][i].T)
        _copy(getattr(block, name).bias, layers['mlp'][name]['bias'][i])
    _copy_norm(self.final_norm, p['final_norm'])


def _copy(param, value):
  with torch.no_grad():
    param.copy_(torch.as_tensor(np.array(value)))  # A writable copy.


def _copy_dense(linear, p):
  _copy(linear.weight, p['kernel'].T)
  _copy(linear.bias, p['bias'])


def _copy_norm(norm, p, layer=None):
  pick = (lambda a: a) if layer is None else (lambda a: a[layer])
  _copy(norm.weight, pick(p['scale']))
  _copy(norm.bias, pick(p['bias']))


# bigjax model class name -> reference class.
REFERENCES = {'CNN': CNN, 'RNNClassifier': LSTMClassifier, 'DecoderLM': GPT}


def has_reference(model) -> bool:
  return type(model).__name__ in REFERENCES


def build(model, *, image_shape=(28, 28, 1), seq_len: int = 0) -> nn.Module:
  """The reference of a bigjax flax module (float32, on the CPU).

  Args:
    model: a bigjax CNN, RNNClassifier (LSTM) or DecoderLM.
    image_shape: (H, W, C) of the image models' inputs.
    seq_len: the longest sequence a DecoderLM reads (RoPE tables).
  """
  family = type(model).__name__
  if family not in REFERENCES:
    raise NotImplementedError(f'no torch reference of {family}')
  if family == 'DecoderLM':
    return GPT(model, seq_len)
  return REFERENCES[family](model, image_shape)


def load_flax_params(model: nn.Module, params) -> None:
  """Copies a bigjax model's parameters (NumPy pytree) into `model`."""
  model.load_flax(params)


def parameter_count(model: nn.Module) -> int:
  """Trainable parameters."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inputs(model, batch: dict) -> dict:
  """A bigjax batch (NumPy) for `model` (the bigjax module) as its
  reference's tensors: 'inputs', 'targets' and, for token models, the loss
  'mask'."""
  name = type(model).__name__
  if name == 'DecoderLM':
    return {'inputs': torch.as_tensor(batch['inputs'], dtype=torch.long),
            'targets': torch.as_tensor(batch['targets'], dtype=torch.long),
            'mask': torch.as_tensor(batch['mask'])}
  images = np.asarray(batch['image'])
  images = (images.transpose(0, 3, 1, 2) if name == 'CNN'
            else images.reshape(images.shape[0], images.shape[1], -1))
  return {'inputs': torch.as_tensor(np.ascontiguousarray(images)),
          'targets': torch.as_tensor(batch['label'], dtype=torch.long)}


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """AdamW groups: decay on what bigjax.losses.is_penalised picks (weight
  matrices, kernels and embeddings), none on biases and norms."""
  decayed, plain = [], []
  for module in model.modules():
    for name, p in module.named_parameters(recurse=False):
      if p.requires_grad:
        is_weight = name.startswith('weight') and not isinstance(
            module, nn.LayerNorm)
        (decayed if is_weight else plain).append(p)
  return [{'params': decayed, 'weight_decay': weight_decay},
          {'params': plain, 'weight_decay': 0.0}]


def _lr_factor(opt, total_steps: int):
  """bigjax.optimizers.make_schedule as a multiplier of the peak rate."""
  if opt.schedule == 'constant':
    return lambda step: 1.0
  warmup = opt.warmup_steps
  decay = max(total_steps, warmup + 1) - warmup
  end = opt.final_lr_fraction

  def factor(step):
    if step < warmup:
      return step / warmup
    progress = min(step - warmup, decay) / decay
    return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress))
  return factor


class Trainer:
  """One training step of `model` with config's loss, optimiser and clipping.

  Attributes:
    model: the reference (in training mode).
    step: (batch tensors from `inputs`) -> loss, one update.
  """

  def __init__(self, config, model: nn.Module, *, total_steps: int,
               compile_model: bool = False):
    opt = config.optimizer
    if config.loss.name != 'cross_entropy' or config.loss.label_smoothing:
      raise NotImplementedError('torch references train with plain '
                                'cross-entropy only')
    if opt.name not in ('adam', 'adamw') or opt.frozen or opt.lr_multipliers:
      raise NotImplementedError(f'torch references train with plain Adam or '
                                f'AdamW, not {opt.name!r} or groups')
    self.model = model.train()
    self._forward = torch.compile(model) if compile_model else model
    self._params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(lr=opt.learning_rate, betas=(opt.b1, opt.b2), eps=opt.eps)
    if opt.name == 'adam':
      self.optimizer = torch.optim.Adam(self._params, **kwargs)
    else:  # Decoupled decay on the weights bigjax penalises only.
      self.optimizer = torch.optim.AdamW(
          _decay_groups(model, opt.weight_decay), **kwargs)
    self.scheduler = torch.optim.lr_scheduler.LambdaLR(
        self.optimizer, _lr_factor(opt, total_steps))
    self._clip = opt.grad_clip_norm

  def step(self, batch: dict):
    self.optimizer.zero_grad(set_to_none=True)
    logits = self._forward(batch['inputs'])
    if 'mask' in batch:  # Mean over the unmasked tokens.
      losses = F.cross_entropy(logits.flatten(0, 1), batch['targets'].flatten(),
                               reduction='none')
      mask = batch['mask'].flatten()
      loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    else:
      loss = F.cross_entropy(logits, batch['targets'])
    loss.backward()
    if self._clip > 0:
      nn.utils.clip_grad_norm_(self._params, self._clip)
    self.optimizer.step()
    self.scheduler.step()
    return loss
