"""Tasks: what one kind of problem adds to the one training loop.

The loop in `bigjax/train.py` is the same for every problem; a task supplies
the rest, as plain methods bound into the jitted steps:

  data      `train_batches` / `eval_batches`: host batches (dicts of NumPy
            arrays, this process's rows of each global batch);
  model     `dummy_inputs` to initialise it, `model_inputs(batch)` for what
            `model.apply` reads, `model_kwargs` it must agree with;
  loss      `loss(logits, batch)`: the mean training loss and metrics;
  eval      `eval_sums(logits, batch)`: sums that add up over batches (so the
            eval split is reduced exactly, padding masked out), and
            `eval_scalars(sums)`: the reported metrics;
  pictures  `write_pictures(...)`: what an evaluation draws.

`config.task` names the task (TASKS). Each is a frozen dataclass, built once
from the config; nothing in a step branches on the config.

  classification  images -> one of N classes (Fashion-MNIST): accuracy, loss,
                  precision / recall / F1 per class and macro, confusion.
  text_classification
                  passages of text -> the work they come from (a downstream
                  task for a fine-tuned language model): as classification.
  language_model  next-token prediction on a text stream (Shakespeare):
                  loss in nats per token, bits per token (per character for
                  the char tokenizer), perplexity, accuracy per token.
  seq2seq         algorithmic source -> target tasks (copy, reverse, sort,
                  addition): teacher-forced loss, per-token accuracy and
                  exact-sequence match.
"""

import dataclasses
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bigjax import metrics as metrics_lib
from bigjax.data import input_pipeline
from bigjax.data import synthetic
from bigjax.data import text
from bigjax.errors import UserError

TASKS = ('classification', 'text_classification', 'language_model', 'seq2seq')


def _masked_mean(values, mask):
  """sum(values * mask) / sum(mask), 0 for an all-zero mask."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class _Classifier:
  """Shared by the classification tasks: one label per example.

  Subclasses provide `num_classes`, `class_names`, `loss_fn` and
  `model_inputs`.
  """

  @property
  def model_kwargs(self) -> dict:
    return {'num_classes': self.num_classes}

  def loss(self, logits, batch):
    """Mean loss over the batch, and {'accuracy'}."""
    loss = jnp.mean(self.loss_fn(logits, batch['label']))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
    return loss, {'accuracy': accuracy}

  def eval_sums(self, logits, batch):
    """{'loss_sum', 'count', 'confusion' [classes, classes], 'predictions' [B]}."""
    predictions = jnp.argmax(logits, -1)
    mask = batch['mask']
    return {
        'loss_sum': jnp.sum(self.loss_fn(logits, batch['label']) * mask),
        'count': jnp.sum(mask),
        'confusion': metrics_lib.confusion_matrix(
            batch['label'], predictions, self.num_classes, mask=mask),
        'predictions': predictions,
    }

  def eval_scalars(self, sums) -> dict[str, float]:
    report = metrics_lib.classification_report(sums['confusion'],
                                               self.class_names)
    report['loss'] = float(sums['loss_sum'] / sums['count'])
    return report

  def _plot_confusion(self, pictures_dir, sums):
    from bigjax import plots  # matplotlib only when drawing.
    plots.plot_confusion_matrix(
        sums['confusion'], os.path.join(pictures_dir, 'confusion_matrix.png'),
        class_names=self.class_names)

  def save_assets(self, workdir):
    del workdir  # Nothing beyond the checkpoint describes the model.

  def write_samples(self, workdir, *, step, model, params, samples_config):
    del workdir, step, model, params, samples_config  # Nothing to generate.


@dataclasses.dataclass(frozen=True)
class Classification(_Classifier):
  """Images [B, H, W, C] -> logits [B, num_classes]; batches carry 'image',
  'label' and, for eval, 'mask' (0 for padding)."""
  data_config: Any
  info: input_pipeline.DatasetInfo
  loss_fn: Callable

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.info.class_names

  @property
  def num_train_examples(self) -> int:
    return self.info.num_train_examples

  def dummy_inputs(self):
    return jnp.zeros((1, *self.info.image_shape), jnp.float32)

  def model_inputs(self, batch):
    return batch['image']

  def train_batches(self, *, global_batch_size, seed, start_step):
    return input_pipeline.train_batches(
        self.data_config, global_batch_size=global_batch_size, seed=seed,
        start_step=start_step)

  def eval_batches(self, *, global_batch_size):
    return input_pipeline.eval_batches(self.data_config,
                                       global_batch_size=global_batch_size)

  def write_pictures(self, pictures_dir, *, sums, first_batch):
    from bigjax import plots  # matplotlib only when drawing.
    self._plot_confusion(pictures_dir, sums)
    plots.plot_predictions(
        first_batch['image'], first_batch['label'], first_batch['predictions'],
        os.path.join(pictures_dir, 'predictions.png'),
        class_names=self.class_names)


@dataclasses.dataclass(frozen=True)
class TextClassification(_Classifier):
  """Passages int32 [B, L] -> logits [B, works]: which work is this from?

  Every work of the training split is a class; its last
  `data.passage_holdout` of text is the evaluation set (`text.passages`).
  A downstream task for a character language model, fine-tuned.
  """
  data_config: Any
  loss_fn: Callable
  tokenizer: Any = None
  data: Any = None  # text.Passages

  @property
  def num_classes(self) -> int:
    return len(self.data.names)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.data.names

  @property
  def num_train_examples(self) -> int:
    return sum(len(t) for t in self.data.train) // self.data.seq_len

  def dummy_inputs(self):
    return jnp.zeros((1, self.data.seq_len), jnp.int32)

  def model_inputs(self, batch):
    return batch['inputs']

  def train_batches(self, *, global_batch_size, seed, start_step):
    return text.passage_train_batches(
        self.data, global_batch_size=global_batch_size, seed=seed,
        start_step=start_step)

  def eval_batches(self, *, global_batch_size):
    return text.passage_eval_batches(self.data,
                                     global_batch_size=global_batch_size)

  def write_pictures(self, pictures_dir, *, sums, first_batch):
    del first_batch
    self._plot_confusion(pictures_dir, sums)

  def save_assets(self, workdir):
    _save_tokenizer(self.tokenizer, workdir)


@dataclasses.dataclass(frozen=True)
class _TokenTask:
  """Shared by the token tasks: masked per-token loss and its sums.

  Subclasses define `_targets_and_mask(batch)`.
  """
  data_config: Any
  loss_fn: Callable

  def loss(self, logits, batch):
    """Mean loss per (unmasked) target token, and {'accuracy' per token}."""
    targets, mask = self._targets_and_mask(batch)
    loss = _masked_mean(self.loss_fn(logits, targets), mask)
    accuracy = _masked_mean(jnp.argmax(logits, -1) == targets, mask)
    return loss, {'accuracy': accuracy}

  def _token_sums(self, logits, batch):
    targets, mask = self._targets_and_mask(batch)
    correct = (jnp.argmax(logits, -1) == targets) * mask
    sums = {'loss_sum': jnp.sum(self.loss_fn(logits, targets) * mask),
            'count': jnp.sum(mask), 'correct': jnp.sum(correct)}
    return sums, correct, mask

  @staticmethod
  def _token_scalars(sums) -> dict[str, float]:
    loss = float(sums['loss_sum'] / max(float(sums['count']), 1.0))
    return {'loss': loss, 'bits_per_token': loss / math.log(2),
            'perplexity': math.exp(min(loss, 700.0)),
            'accuracy': float(sums['correct'] / max(
                float(sums['count']), 1.0)),
            'num_tokens': float(sums['count'])}

  def write_pictures(self, pictures_dir, *, sums, first_batch):
    del pictures_dir, sums, first_batch  # Curves only (drawn by the loop).

  def write_samples(self, workdir, *, step, model, params, samples_config):
    del workdir, step, model, params, samples_config  # See LanguageModel.


@dataclasses.dataclass(frozen=True)
class LanguageModel(_TokenTask):
  """Token windows [B, L] -> next-token logits [B, L, vocab].

  Batches carry 'inputs', 'targets' (inputs shifted by one) and 'mask'.
  With the char tokenizer a token is a character, so `bits_per_token` is
  bits per character (each document's end-of-text token counts as one).
  """
  tokenizer: Any = None
  info: Any = None  # text.TextInfo

  @property
  def num_train_examples(self) -> int:
    return self.info.num_train_examples

  @property
  def model_kwargs(self) -> dict:
    return {'vocab_size': self.info.vocab_size}

  def dummy_inputs(self):
    return jnp.zeros((1, self.info.seq_len), jnp.int32)

  def model_inputs(self, batch):
    return batch['inputs']

  def _targets_and_mask(self, batch):
    return batch['targets'], batch['mask']

  def eval_sums(self, logits, batch):
    return self._token_sums(logits, batch)[0]

  def eval_scalars(self, sums) -> dict[str, float]:
    return self._token_scalars(sums)

  def train_batches(self, *, global_batch_size, seed, start_step):
    return text.train_batches(
        self.data_config, tokenizer=self.tokenizer,
        global_batch_size=global_batch_size, seed=seed, start_step=start_step)

  def eval_batches(self, *, global_batch_size):
    return text.eval_batches(self.data_config, tokenizer=self.tokenizer,
                             global_batch_size=global_batch_size)

  def save_assets(self, workdir):
    _save_tokenizer(self.tokenizer, workdir)

  def write_samples(self, workdir, *, step, model, params, samples_config):
    """Appends a sampled continuation of `samples_config.prompt` to
    WORKDIR/samples.txt (and the log): what the model writes, as it learns.

    Every process computes it (a global computation); process 0 writes.
    """
    if samples_config.num_tokens <= 0:
      return
    from bigjax import decoding  # Only language models decode.
    prompt = np.concatenate([[text.BOS_ID], self.tokenizer.encode(
        samples_config.prompt)]).astype(np.int32)[None]
    tokens = decoding.sample(
        model, params, jnp.asarray(prompt), jax.random.key(step),
        max_new_tokens=samples_config.num_tokens,
        temperature=samples_config.temperature)
    sample = samples_config.prompt + self.tokenizer.decode(
        np.asarray(jax.device_get(tokens))[0])
    logging.info('Sample at step %d: %r', step, sample[:200])
    if jax.process_index() == 0:
      with open(os.path.join(workdir, 'samples.txt'), 'a') as f:
        f.write(f'==== step {step} ====\n{sample}\n')


@dataclasses.dataclass(frozen=True)
class Seq2Seq(_TokenTask):
  """Source [B, Ls] and shifted target [B, Lt] -> target logits [B, Lt, V].

  Batches carry 'inputs', 'targets' (ending in EOS), 'decoder_inputs' (BOS +
  targets[:-1]), 'input_mask' and 'target_mask'. Exact match is measured
  teacher-forced: every target token is the argmax given the true prefix.
  That equals exact match of greedy decoding, since greedy decoding then
  reproduces the true prefix at every step (and vice versa).
  """

  @property
  def _task(self):
    return self.data_config.synthetic

  # Generated tasks have no epochs: train for config.num_train_steps.
  num_train_examples = None

  @property
  def model_kwargs(self) -> dict:
    return {'vocab_size': synthetic.vocab_size(self._task.task,
                                               self._task.num_symbols)}

  def dummy_inputs(self):
    source, target = synthetic.padded_lengths(self._task.task,
                                              self._task.max_length)
    return {'src': jnp.zeros((1, source), jnp.int32),
            'tgt': jnp.zeros((1, target), jnp.int32)}

  def model_inputs(self, batch):
    return {'src': batch['inputs'], 'tgt': batch['decoder_inputs'],
            'src_valid': batch['input_mask'] > 0,
            'tgt_valid': batch['target_mask'] > 0}

  def _targets_and_mask(self, batch):
    return batch['targets'], batch['target_mask']

  def eval_sums(self, logits, batch):
    sums, correct, mask = self._token_sums(logits, batch)
    # A sequence is right when every real target token is; padding rows of
    # the eval batch (mask all zero) are not sequences.
    real = jnp.any(mask > 0, axis=-1)
    exact = jnp.all((correct > 0) | (mask == 0), axis=-1) & real
    return dict(sums, exact=jnp.sum(exact), sequences=jnp.sum(real))

  def eval_scalars(self, sums) -> dict[str, float]:
    scalars = self._token_scalars(sums)
    scalars['exact_match'] = float(sums['exact'] / max(
        float(sums['sequences']), 1.0))
    scalars['num_sequences'] = float(sums['sequences'])
    return scalars

  def train_batches(self, *, global_batch_size, seed, start_step):
    return synthetic.train_batches(self._task,
                                   global_batch_size=global_batch_size,
                                   seed=seed, start_step=start_step)

  def eval_batches(self, *, global_batch_size):
    return synthetic.eval_batches(self._task,
                                  global_batch_size=global_batch_size)

  def save_assets(self, workdir):
    del workdir  # The task config (in config.json) defines the vocabulary.


def _save_tokenizer(tokenizer, workdir):
  """Keeps the vocabulary beside the checkpoints (process 0)."""
  path = os.path.join(workdir, text.TOKENIZER_FILE)
  if jax.process_index() == 0 and not os.path.exists(path):
    text.save_tokenizer(tokenizer, path)


def _tokenizer(config, workdir):
  """The run's tokenizer: its workdir's if resumed, else that of the run it
  is initialised from (the ids of its embeddings), else built from the data."""
  for source in (workdir, config.init_from.workdir):
    if source and os.path.exists(os.path.join(source, text.TOKENIZER_FILE)):
      return text.load_or_build_tokenizer(config.data, source)
  return text.load_or_build_tokenizer(config.data, None)


def make_task(config, loss_fn, workdir=None):
  """The task `config.task` names, with its data described (no batches yet).

  Raises UserError for an unknown task or unusable data. `workdir` is read
  only: an existing run's tokenizer is reused from it.
  """
  if config.task == 'classification':
    return Classification(config.data, input_pipeline.dataset_info(config.data),
                          loss_fn)
  if config.task == 'language_model':
    tokenizer = _tokenizer(config, workdir)
    return LanguageModel(config.data, loss_fn, tokenizer,
                         text.text_info(config.data, tokenizer))
  if config.task == 'text_classification':
    tokenizer = _tokenizer(config, workdir)
    return TextClassification(config.data, loss_fn, tokenizer,
                              text.passages(config.data, tokenizer))
  if config.task == 'seq2seq':
    synthetic.check_config(config.data.synthetic)
    return Seq2Seq(config.data, loss_fn)
  raise UserError(f'config.task={config.task!r} is not one of '
                  f'{", ".join(map(repr, TASKS))}')
