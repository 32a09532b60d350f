"""The models `benchmarks.run` times, and their data made up.

Each setting is a config file plus overrides. `synthetic_experiment` builds
it with `train.build_experiment`, its data described rather than read (no
dataset needed), and `synthetic_batch` makes a training batch of the input
pipeline's keys, shapes and dtypes.
"""

import dataclasses
import os

import numpy as np

from benchmarks import report
from bigjax import tasks
from bigjax import train
from bigjax.data import input_pipeline
from bigjax.data import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (28, 28, 1)  # Fashion-MNIST's.


@dataclasses.dataclass(frozen=True)
class Setting:
  """A benchmarked model: a config file and dotted-key overrides."""
  config: str
  overrides: tuple[tuple[str, object], ...] = ()


SETTINGS = {
    'cnn': Setting('configs/cnn_fashion_mnist.py'),
    'lstm': Setting('configs/lstm_fashion_mnist.py'),
    # The small GPT: 4 layers of width 256, 4 heads, 256 tokens of a
    # 256-symbol vocabulary; otherwise the Shakespeare LM's recipe (pre-LN,
    # RoPE, tied embeddings, AdamW, clipping, batch 32).
    'transformer_lm': Setting('configs/transformer_shakespeare.py', (
        ('model.d_model', 256), ('model.num_layers', 4),
        ('model.num_heads', 4), ('model.mlp_dim', 1024),
        ('model.vocab_size', 256), ('model.max_len', 256),
        ('data.seq_len', 256),
        # The depth scan unrolled: 14% faster steps on the CPU (interleaved
        # A/B, 1 core, 5.19 -> 4.47 s), XLA then slicing the stacked
        # parameters and saved activations statically.
        ('model.scan_unroll', 4),
        # The CPU's attention kernel (cache-sized pieces, causal half
        # skipped, backward written out): the step 2.30 -> 1.94-2.02 s against
        # the einsum kernel (attention.py's _blocked_attention).
        ('model.attention_kernel', 'blocked'))),
    'vit': Setting('configs/vit_fashion_mnist.py'),
    # The GPU model: a GPT of 151M parameters (12 layers of width
    # 1024, 16 heads of 64, feed-forward 4096, byte vocabulary) on 8 x 2048
    # tokens, with cuDNN's fused attention; bfloat16 in the gpu suite.
    'transformer_lm_gpu': Setting('configs/transformer_shakespeare.py', (
        ('model.d_model', 1024), ('model.num_layers', 12),
        ('model.num_heads', 16), ('model.mlp_dim', 4096),
        ('model.vocab_size', 256), ('model.max_len', 2048),
        ('model.attention_kernel', 'cudnn'), ('model.dropout_rate', 0.0),
        ('data.seq_len', 2048), ('batch_size', 8))),
}

# The models each suite of `benchmarks.run` times by default.
SUITES = {'cpu': ('cnn', 'lstm', 'transformer_lm', 'vit'),
          'gpu': ('cnn', 'lstm', 'transformer_lm', 'vit',
                  'transformer_lm_gpu')}


def load_config(name: str):
  """The config of SETTINGS[name], overrides applied."""
  setting = SETTINGS[name]
  config = report.load_config(os.path.join(ROOT, setting.config))
  config.update_from_flattened_dict(dict(setting.overrides))
  return config


def described_task(config, loss_fn, workdir=None):
  """config's task with its data described rather than read: what
  `tasks.make_task` returns once a dataset is prepared, without one."""
  del workdir
  if config.task == 'classification':
    n = config.model.num_classes
    return tasks.Classification(config.data, input_pipeline.DatasetInfo(
        num_classes=n, class_names=tuple(map(str, range(n))),
        image_shape=IMAGE_SHAPE, num_train_examples=60_000,
        num_eval_examples=10_000), loss_fn)
  if config.task == 'language_model':
    tokens = 1_000_000
    seq_len = config.data.seq_len
    return tasks.LanguageModel(config.data, loss_fn, None, text.TextInfo(
        vocab_size=config.model.vocab_size, seq_len=seq_len,
        num_train_tokens=tokens, num_eval_tokens=tokens // 10,
        num_train_examples=tokens // seq_len,
        num_eval_examples=tokens // 10 // seq_len))
  raise ValueError(f'no synthetic data for task {config.task!r}')


def synthetic_experiment(config) -> train.Experiment:
  """`train.build_experiment(config)` on described data (no dataset)."""
  return train.build_experiment(config, make_task=described_task)


def synthetic_batch(config, seed: int = 0) -> dict:
  """One training batch (NumPy) of the input pipeline's keys and shapes."""
  rng = np.random.default_rng(seed)
  b = config.batch_size
  if config.task == 'language_model':
    t = config.data.seq_len
    window = rng.integers(0, config.model.vocab_size, (b, t + 1), np.int32)
    return {'inputs': window[:, :-1], 'targets': window[:, 1:],
            'mask': np.ones((b, t), np.float32)}
  return {'image': rng.standard_normal((b, *IMAGE_SHAPE), np.float32),
          'label': rng.integers(0, config.model.num_classes, b, np.int32)}


def items_per_step(config) -> tuple[int, str]:
  """What a step consumes: (count, "examples" or "tokens")."""
  if config.task == 'language_model':
    return config.batch_size * config.data.seq_len, 'tokens'
  return config.batch_size, 'examples'


