"""Tiny configs and models for the sharding tests, and their golden tables.

Sizes are small for speed but divisible where the rules should split (heads,
widths by 2) and not where they should fall back (10 classes, 1 input
channel), so the golden tables exercise both.
"""

import os

import jax
import jax.numpy as jnp

from bigjax import sharding
from bigjax.models import axes
from bigjax.models import recurrent
from bigjax.models import transformer
from configs import cnn_fashion_mnist
from configs import gru_fashion_mnist
from configs import lstm_fashion_mnist
from configs import vit_fashion_mnist

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden', 'sharding')
# The mesh and preset the golden tables are written for.
GOLDEN_SIZES = {'data': 2, 'fsdp': 2, 'tensor': 2}
GOLDEN_PRESET = 'fsdp_tensor'


def get_config(name: str, data_dir: str):
  """The ':smoke' config of model `name`, made tiny, 10 steps logged each."""
  module = {'cnn': cnn_fashion_mnist, 'resnet': cnn_fashion_mnist,
            'lstm': lstm_fashion_mnist, 'gru': gru_fashion_mnist,
            'vit': vit_fashion_mnist}[name]
  c = module.get_config('smoke')
  c.data.tfds_data_dir = data_dir
  c.batch_size = 16
  c.eval_batch_size = 200
  c.num_train_steps = 10
  c.log_every_steps = 1
  c.eval_every_steps = 10
  c.checkpoint.save_every_steps = 10
  c.write_plots = False
  if name == 'resnet':
    with c.unlocked():
      c.model = type(c.model)({'name': 'resnet', 'num_classes': 10,
                               'stage_features': (8, 16), 'blocks_per_stage': 1})
  elif name in ('lstm', 'gru'):
    c.model.hidden_size = 16
  elif name == 'vit':
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.mlp_dim = 64
  return c


def sequence_models():
  """Models outside the image classifiers, with an input to init them on."""
  tokens = jnp.zeros((1, 16), jnp.int32)
  lm = dict(vocab_size=70, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)
  return {
      'decoder_lm': (transformer.DecoderLM(**lm), (tokens,)),
      'decoder_lm_untied': (transformer.DecoderLM(**lm, tie_embeddings=False),
                            (tokens,)),
      'lm_classifier': (transformer.DecoderClassifier(**lm, num_classes=36),
                        (tokens,)),
      'encoder_decoder': (transformer.EncoderDecoder(**lm),
                          ({'src': tokens, 'tgt': tokens},)),
      # Tied through an output projection (hidden 16 -> embedding 8).
      'rnn_lm': (recurrent.RNNLM(vocab_size=70, hidden_size=16, num_layers=2,
                                 embedding_dim=8, tie_embeddings=True),
                 (tokens,)),
      'rnn_seq2seq': (recurrent.RNNSeq2Seq(vocab_size=70, hidden_size=16,
                                           attention='additive'),
                      ({'src': tokens, 'tgt': tokens},)),
      'rnn_seq2seq_dot': (recurrent.RNNSeq2Seq(vocab_size=70, cell='gru',
                                               hidden_size=16, attention='dot'),
                          ({'src': tokens, 'tgt': tokens},)),
  }


def golden_path(name: str) -> str:
  return os.path.join(GOLDEN_DIR, f'{name}.txt')


def table(boxed_params) -> str:
  """'path  logical axes  spec' lines under the golden mesh and preset."""
  specs = sharding.logical_specs(boxed_params,
                                 sharding.PRESETS[GOLDEN_PRESET], GOLDEN_SIZES)
  boxes = jax.tree_util.tree_leaves_with_path(
      boxed_params, is_leaf=sharding.is_box)
  rows = []
  for (path, box), spec in zip(boxes, jax.tree.leaves(specs)):
    names = ','.join(n or '-' for n in box.names)
    rows.append((axes.path_text(path), names,
                 sharding.spec_text(spec, len(box.names))))
  widths = [max(len(r[i]) for r in rows) for i in range(2)]
  header = (f'# {GOLDEN_PRESET} on mesh '
            + ' x '.join(f'{a}={s}' for a, s in GOLDEN_SIZES.items())
            + ': parameter, logical axes, PartitionSpec.\n'
            '# Regenerate: BIGJAX_UPDATE_GOLDEN=1 python -m pytest '
            'tests/test_sharding.py -k golden\n')
  return header + '\n'.join(
      f'{p.ljust(widths[0])}  {n.ljust(widths[1])}  {s}' for p, n, s in rows) + '\n'


def read_golden_specs(name: str) -> dict[str, str]:
  """{parameter path: spec text} from a golden table."""
  with open(golden_path(name)) as f:
    rows = [line.split() for line in f if not line.startswith('#')]
  return {r[0]: r[2] for r in rows if r}
