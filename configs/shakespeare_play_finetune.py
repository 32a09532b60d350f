r"""Fine-tunes the character Transformer LM to tell which work a passage is from.

Run, after training configs/transformer_shakespeare.py in WORKDIR_LM:

  python -m experiments.train --config=configs/shakespeare_play_finetune.py \
      --workdir=workdirs/play_finetune --config.init_from.workdir=WORKDIR_LM

Without `init_from.workdir` the same model trains from scratch (the baseline
`python -m benchmarks.finetune` compares it with). Variants, after a colon:
`:smoke` trains for a few steps on small batches (for tests).

Task (`text_classification`): passages of 128 characters, labelled by which
of the 36 training works of `shakespeare_local` they come from; the last 10%
of each work's text is held out for evaluation (unseen passages of known
works). Model: the language model's body (same sizes and parameter names,
`lm_classifier`), its final hidden states averaged over the passage into a
fresh zero-initialised head. Every parameter but the head comes from the
language model (`init_from.params`), the optimiser state starts fresh, and
the pretrained body learns 10x slower than the head.
"""

from configs import base
from configs import transformer_shakespeare


def get_config(arg=None):
  lm = transformer_shakespeare.get_config()
  c = base.get_config()
  c.task = 'text_classification'
  c.data = lm.data
  c.data.passage_holdout = 0.1
  c.model = lm.model
  with c.model.unlocked():
    c.model.name = 'lm_classifier'
    c.model.num_classes = 36
    c.model.pooling = 'mean'
    del c.model['tie_embeddings']

  c.init_from.params = ('(?!head/).*',)  # Everything but the head.
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.lr_multipliers = (('(?!head/).*', 0.1),)

  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_train_steps = 300
  c.eval_every_steps = 300
  c.log_every_steps = 25
  c.checkpoint.save_every_steps = 300
  return base.apply_variant(c, arg, 'shakespeare_play_finetune')
