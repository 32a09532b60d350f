r"""An encoder-decoder Transformer on generated seq2seq tasks.

Run (the argument after the colon picks the task; add ',smoke' for a few
steps on small batches, for tests):

  python -m experiments.train --config=configs/transformer_seq2seq.py:addition \
      --workdir=workdirs/seq2seq_addition
  python -m experiments.train --config=configs/transformer_seq2seq.py:reverse \
      --workdir=workdirs/seq2seq_reverse

  addition  'a+b=' -> the digits of a + b, a and b of 1 to 5 decimal digits,
            written zero-padded to 5 digits (the sum to 6), so equal place
            values sit at fixed positions (`data.synthetic.zero_pad`; without
            it, 4,000 steps reached 88% exact match instead of 100%);
  reverse   a sequence of 1 to 20 symbols (of 10) -> the same reversed;
  copy, sort  likewise, for ablations (`--config.data.synthetic.*`).

Reported: teacher-forced loss, per-token accuracy and exact-sequence match
(`eval/exact_match`; equal to the exact match of greedy decoding, see
bigjax/tasks.py) on a fixed set of 1,024 examples no training seed changes.

Model: 3 encoder and 3 decoder layers of width 128, 4 heads, learned
positions, shared tied embeddings (0.9M parameters); AdamW 1e-3 with warmup
and cosine decay.
"""

from configs import base

TASKS = ('addition', 'reverse', 'copy', 'sort')


def get_config(arg='addition'):
  task, *variant = (arg or 'addition').split(',')
  if task not in TASKS:
    raise ValueError(f'unknown task {task!r} of transformer_seq2seq; use one '
                     f'of {TASKS}, optionally followed by ",smoke"')
  c = base.get_config()
  c.task = 'seq2seq'
  c.data.synthetic.task = task
  c.data.synthetic.min_length = 1
  c.data.synthetic.max_length = 5 if task == 'addition' else 20
  c.data.synthetic.num_symbols = 10
  c.data.synthetic.zero_pad = task == 'addition'

  c.model.name = 'encoder_decoder'
  c.model.vocab_size = 15 if task == 'addition' else 13
  c.model.max_len = 32
  c.model.d_model = 128
  c.model.num_layers = 3
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.0
  # Speed and memory only (values equal up to rounding, so a resumed run may
  # change them): what each layer keeps for the backward pass ('none':
  # everything; 'full': its input, recomputing the rest; 'save_dots': the
  # matmuls' outputs), and layers per iteration of the scan over depth
  # (num_layers unrolls it whole: faster steps on the CPU, longer compiles).
  c.model.remat = 'none'
  c.model.scan_unroll = 1

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.optimizer.final_lr_fraction = 0.05
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0

  c.batch_size = 64
  c.eval_batch_size = 512
  c.num_train_steps = 4000
  c.eval_every_steps = 1000
  c.log_every_steps = 100
  c.checkpoint.save_every_steps = 1000
  return base.apply_variant(c, ','.join(variant), 'transformer_seq2seq')
