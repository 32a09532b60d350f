"""Algorithmic sequence-to-sequence tasks for long-range ablations.

Tasks (`TASKS`), for a source of n symbols, n uniform in [min_length,
max_length]:

- 'copy':     x1 .. xn          -> x1 .. xn
- 'reverse':  x1 .. xn          -> xn .. x1
- 'sort':     x1 .. xn          -> the xi in ascending order
- 'addition': a + b =           -> the digits of a + b

Addition works in base `num_symbols` (10: decimal); its operands have
n_a and n_b digits, each drawn uniformly from [min_length, max_length], no
leading zeros, most significant digit first, as are the sum's digits. With
`zero_pad`, every operand is written with max_length digits and the sum with
max_length + 1 (leading zeros), so digits of one place value always sit at
the same positions (the values drawn are the same).

Token ids (`vocab_size` in all):

  PAD = 0, BOS = 1, EOS = 2,
  symbols (or digits 0 .. base - 1) = 3 .. 3 + num_symbols - 1,
  addition only: '+' = 3 + num_symbols, '=' = 4 + num_symbols.

Batches are {'inputs': int32 [B, Lin], 'targets': int32 [B, Lout],
'decoder_inputs': int32 [B, Lout], 'input_mask': float32 [B, Lin],
'target_mask': float32 [B, Lout]}:

- inputs hold the source, then PAD; no BOS or EOS (for addition the source
  ends with '='). Lin = max_length for copy/reverse/sort and
  2 * max_length + 2 for addition.
- targets hold the answer, then EOS, then PAD. Lout = max_length + 1, or
  max_length + 2 for addition (the sum may have one digit more).
- decoder_inputs = BOS + targets[:, :-1] (`shift_right`), what a decoder
  reads when it is trained with teacher forcing to predict targets.
- the masks are 1 on real tokens (target_mask includes the EOS), 0 on PAD.

A decoder-only model can read [source, BOS, answer]: the real tokens of
inputs followed by decoder_inputs, with its loss on targets.

Training batch number `step` is a pure function of (seed, step). The eval
set is fixed by `eval_seed` alone, drawn from a random stream disjoint from
any training seed's, and is the same for every run and batch size. (For short
lengths the space of examples is small, and eval examples then also occur in
training by chance; the ablations are about long sequences.)

Config (`config.data.synthetic`): task, min_length, max_length, num_symbols,
zero_pad, num_eval_examples, eval_seed.
"""

from collections.abc import Iterator
import itertools

import numpy as np

from bigjax import errors
from bigjax.data import input_pipeline

Batch = dict[str, np.ndarray]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
FIRST_SYMBOL = 3
TASKS = ('copy', 'reverse', 'sort', 'addition')
# Random streams: training batches and eval blocks never share a generator
# seed, whatever the seeds (input_pipeline and text use 0, 1 and 2).
_TRAIN_STREAM = 3
_EVAL_STREAM = 4
# The eval set is drawn in blocks of this many examples, so example i does
# not depend on num_eval_examples or the batch size.
_EVAL_BLOCK = 256


def vocab_size(task: str, num_symbols: int) -> int:
  """Number of token ids, specials included (see the module docstring)."""
  return FIRST_SYMBOL + num_symbols + (2 if task == 'addition' else 0)


def plus_id(num_symbols: int) -> int:
  """Id of addition's '+'."""
  return FIRST_SYMBOL + num_symbols


def equals_id(num_symbols: int) -> int:
  """Id of addition's '='."""
  return FIRST_SYMBOL + num_symbols + 1


def padded_lengths(task: str, max_length: int) -> tuple[int, int]:
  """(Lin, Lout): the padded lengths of inputs and targets."""
  if task == 'addition':
    return 2 * max_length + 2, max_length + 2
  return max_length, max_length + 1


def check_config(task_config) -> None:
  """Raises UserError, one line, if `config.data.synthetic` is unusable."""
  c = task_config
  if c.task not in TASKS:
    raise errors.UserError(
        f'Unknown synthetic task {c.task!r} (config.data.synthetic.task); use '
        f'one of {TASKS}.')
  if not 1 <= c.min_length <= c.max_length:
    raise errors.UserError(
        f'config.data.synthetic.min_length = {c.min_length} and max_length = '
        f'{c.max_length} must satisfy 1 <= min_length <= max_length.')
  smallest = 2 if c.task == 'addition' else 1  # A base needs 2 digits.
  if c.num_symbols < smallest:
    raise errors.UserError(
        f'config.data.synthetic.num_symbols = {c.num_symbols} must be >= '
        f'{smallest} for task {c.task!r}.')
  if c.num_eval_examples < 1 or c.eval_seed < 0:
    raise errors.UserError(
        f'config.data.synthetic.num_eval_examples = {c.num_eval_examples} '
        f'must be >= 1 and eval_seed = {c.eval_seed} >= 0.')


def shift_right(targets: np.ndarray) -> np.ndarray:
  """int [B, L] -> [B, L]: BOS, then targets[:, :-1] (teacher forcing)."""
  return np.concatenate(
      [np.full_like(targets[:, :1], BOS_ID), targets[:, :-1]], axis=1)


def _finish(inputs, input_len, answer, answer_len) -> Batch:
  """Pads inputs [n, Lin] and answers [n, Lout - 1]; appends EOS; masks.

  input_len [n] and answer_len [n] count the real tokens of each row; tokens
  past them must already be PAD.
  """
  n, width = answer.shape
  targets = np.concatenate([answer, np.zeros((n, 1), answer.dtype)], axis=1)
  targets[np.arange(n), answer_len] = EOS_ID
  input_mask = np.arange(inputs.shape[1]) < input_len[:, None]
  target_mask = np.arange(width + 1) <= answer_len[:, None]
  targets = targets.astype(np.int32)
  return {
      'inputs': inputs.astype(np.int32),
      'targets': targets,
      'decoder_inputs': shift_right(targets),
      'input_mask': input_mask.astype(np.float32),
      'target_mask': target_mask.astype(np.float32),
  }


def _symbol_task(task, rng, n, min_length, max_length, num_symbols) -> Batch:
  """copy / reverse / sort of n sequences, as a batch (module docstring)."""
  length = rng.integers(min_length, max_length + 1, size=n)
  symbols = rng.integers(0, num_symbols, size=(n, max_length)) + FIRST_SYMBOL
  real = np.arange(max_length) < length[:, None]
  inputs = np.where(real, symbols, PAD_ID)
  if task == 'copy':
    answer = inputs
  elif task == 'reverse':
    # Row i's position j reads source position length_i - 1 - j.
    source = np.clip(length[:, None] - 1 - np.arange(max_length), 0, None)
    answer = np.where(real, np.take_along_axis(inputs, source, axis=1), PAD_ID)
  else:  # 'sort': padding sorts last because it is made larger than symbols.
    answer = np.sort(np.where(real, symbols, np.iinfo(np.int64).max), axis=1)
    answer = np.where(real, answer, PAD_ID)
  return _finish(inputs, length, answer, length)


def _random_numbers(rng, n, min_digits, max_digits, base):
  """n numbers as little-endian digits [n, max_digits] and digit counts [n].

  The number of digits is uniform in [min_digits, max_digits]; the leading
  digit is nonzero unless the number has one digit (so 0 can occur).
  """
  num_digits = rng.integers(min_digits, max_digits + 1, size=n)
  digits = rng.integers(0, base, size=(n, max_digits))
  leading = rng.integers(1, base, size=n)
  rows = np.arange(n)
  digits[rows, num_digits - 1] = np.where(
      num_digits > 1, leading, digits[rows, num_digits - 1])
  digits[np.arange(max_digits) >= num_digits[:, None]] = 0
  return digits, num_digits


def _big_endian(digits, num_digits, width, offset):
  """Row i's positions [offset_i, offset_i + num_digits_i) of a [n, width]
  canvas, holding digits[i] most significant first; -1 elsewhere."""
  position = np.arange(width) - offset[:, None]  # Place within the number.
  inside = (position >= 0) & (position < num_digits[:, None])
  source = np.clip(num_digits[:, None] - 1 - position, 0, digits.shape[1] - 1)
  return np.where(inside, np.take_along_axis(digits, source, axis=1), -1)


def _addition(rng, n, min_length, max_length, base, zero_pad) -> Batch:
  """n additions 'a+b=' -> digits of a + b (module docstring)."""
  a, a_len = _random_numbers(rng, n, min_length, max_length, base)
  b, b_len = _random_numbers(rng, n, min_length, max_length, base)
  if zero_pad:  # The digits past a number's length are already zeros.
    a_len = b_len = np.full(n, max_length)
  # Schoolbook addition with carries, digit by digit, for the whole batch.
  total = np.zeros((n, max_length + 1), np.int64)
  carry = np.zeros(n, np.int64)
  for k in range(max_length):
    column = a[:, k] + b[:, k] + carry
    total[:, k], carry = column % base, column // base
  total[:, max_length] = carry
  nonzero = total != 0
  total_len = np.where(nonzero.any(axis=1),
                       max_length + 1 - np.argmax(nonzero[:, ::-1], axis=1), 1)
  if zero_pad:
    total_len = np.full(n, max_length + 1)
  width, answer_width = padded_lengths('addition', max_length)
  a_digits = _big_endian(a, a_len, width, np.zeros(n, np.int64))
  b_digits = _big_endian(b, b_len, width, a_len + 1)
  position = np.arange(width)
  inputs = np.select(
      [a_digits >= 0, position == a_len[:, None], b_digits >= 0,
       position == (a_len + b_len + 1)[:, None]],
      [a_digits + FIRST_SYMBOL, plus_id(base), b_digits + FIRST_SYMBOL,
       equals_id(base)], PAD_ID)
  answer = _big_endian(total, total_len, answer_width - 1,
                       np.zeros(n, np.int64))
  answer = np.where(answer >= 0, answer + FIRST_SYMBOL, PAD_ID)
  return _finish(inputs, a_len + b_len + 2, answer, total_len)


def make_examples(task_config, rng: np.random.Generator, n: int) -> Batch:
  """n examples of `config.data.synthetic`'s task, drawn from `rng`.

  Returns:
    The batch dict of the module docstring, with B = n.
  """
  c = task_config
  if c.task == 'addition':
    return _addition(rng, n, c.min_length, c.max_length, c.num_symbols,
                     c.zero_pad)
  return _symbol_task(c.task, rng, n, c.min_length, c.max_length,
                      c.num_symbols)


def train_batches(task_config, *, global_batch_size: int, seed: int,
                  start_step: int = 0) -> Iterator[Batch]:
  """Endless training batches; batch `step` is a pure function of (seed, step).

  Args:
    task_config: `config.data.synthetic`.
    global_batch_size: B, the batch summed over all processes.
    seed: non-negative int.
    start_step: the number of the first batch to yield.

  Returns:
    Iterator of batches (module docstring) of B / P examples for
    P = jax.process_count(), this process's slice of each global batch.
  """
  check_config(task_config)
  local = input_pipeline._local_slice(global_batch_size)
  if seed < 0 or start_step < 0:
    raise errors.UserError(
        f'seed ({seed}) and start step ({start_step}) must be non-negative.')

  def load(step: int) -> Batch:
    rng = np.random.default_rng([seed, _TRAIN_STREAM, step])
    batch = make_examples(task_config, rng, global_batch_size)
    return {key: value[local] for key, value in batch.items()}

  return map(load, itertools.count(start_step))


def eval_examples(task_config) -> Batch:
  """The whole fixed eval set: num_eval_examples examples from eval_seed."""
  check_config(task_config)
  n = task_config.num_eval_examples
  blocks = [make_examples(
      task_config,
      np.random.default_rng([task_config.eval_seed, _EVAL_STREAM, block]),
      _EVAL_BLOCK) for block in range(-(-n // _EVAL_BLOCK))]
  return {key: np.concatenate([b[key] for b in blocks])[:n]
          for key in blocks[0]}


def eval_batches(task_config, *, global_batch_size: int) -> Iterator[Batch]:
  """One pass over the eval set, the last global batch padded.

  Padding examples are all PAD with both masks 0, so sums over target_mask
  count real tokens only and every batch has the same shape.

  Returns:
    Iterator of ceil(num_eval_examples / B) batches of B / P examples, this
    process's slice of each global batch.
  """
  examples = eval_examples(task_config)
  local = input_pipeline._local_slice(global_batch_size)
  n = task_config.num_eval_examples
  num_batches = -(-n // global_batch_size)
  padding = num_batches * global_batch_size - n
  examples = {key: np.pad(value, [(0, padding), (0, 0)])
              for key, value in examples.items()}

  def load(batch_index: int) -> Batch:
    start = batch_index * global_batch_size
    return {key: value[start + local.start:start + local.stop]
            for key, value in examples.items()}

  return map(load, range(num_batches))
