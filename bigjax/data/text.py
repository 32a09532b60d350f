"""Text for language models: tokenizers and next-token batches.

Reads any prepared TFDS dataset whose examples hold a string feature
(`config.data.text_key`), one document per example; our builder
`shakespeare_local` holds one work of Shakespeare per example, with whole
held-out plays as validation and test. Importing this module registers it.

A split becomes one token stream: every document, in the split's order, as
[BOS, its tokens..., EOS], concatenated. Batches are windows of that stream:

- Training window starts are drawn at random per (seed, step), so batch
  number `step` is a pure function of (seed, step). A checkpoint stores only
  the step, and `train_batches(..., start_step=step)` resumes exactly. The
  global batch is drawn first and each process takes its contiguous slice,
  so the data do not depend on the number of processes.
- Evaluation windows are consecutive and do not overlap, padded at the end,
  so every token of the split is a target exactly once: summed loss over
  summed mask is the exact per-token loss of the split. Each window starts
  without the context before it, which raises the loss a little at each
  window's start: compare eval losses at equal seq_len only.

Targets that are BOS (the start of the next document, which follows EOS
deterministically) have mask 0 everywhere, so the loss counts each token of
text (a character, for CharTokenizer) and each document's EOS once.

Tokenizers map text to int32 ids with reserved ids PAD=0, BOS=1, EOS=2,
UNK=3. `CharTokenizer` has one id per character seen in the TRAINING split
(characters it has not seen map to UNK); `ByteTokenizer` one per UTF-8 byte.
A run keeps its tokenizer as WORKDIR/tokenizer.json (`TOKENIZER_FILE`, see
`load_or_build_tokenizer`), so a resumed run uses the same vocabulary even if
the data change.

Batches are cheap slices of an in-memory array (the Shakespeare training
stream is 4.3M tokens, 17 MB as int32), so there is no prefetching.
"""

from collections.abc import Iterable, Iterator
import dataclasses
import itertools
import json
import os

import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import dtype_utils

from bigjax import errors
from bigjax.data import input_pipeline
from bigjax.data import shakespeare_local  # Registers the builder.

Batch = dict[str, np.ndarray]

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>', '<unk>')
TOKENIZER_FILE = 'tokenizer.json'
TOKENIZERS = ('char', 'byte')
# Tag that keeps the window-offset stream apart from other streams derived
# from the same config seed (input_pipeline uses 0 and 1 for images).
_WINDOW_STREAM = 2
_PASSAGE_STREAM = 3
# Decoding writes this for UNK (U+FFFD REPLACEMENT CHARACTER).
_REPLACEMENT = '\ufffd'


# ---- Tokenizers --------------------------------------------------------------


class CharTokenizer:
  """One id per character of a fixed vocabulary, after the 4 special ids.

  Ids: PAD=0, BOS=1, EOS=2, UNK=3, then `chars[i]` is id 4 + i. `encode`
  maps characters outside the vocabulary to UNK and adds no BOS/EOS, so
  `decode(encode(text)) == text` for every text made of vocabulary
  characters.
  """

  kind = 'char'

  def __init__(self, chars: str):
    """`chars`: the vocabulary, each character once, in id order."""
    if len(set(chars)) != len(chars):
      raise errors.UserError(
          f'Tokenizer vocabulary repeats characters: {chars!r}.')
    self.chars = chars
    codes = np.frombuffer(chars.encode('utf-32-le'), '<u4')
    # Sorted code points for a vectorised lookup in `encode`.
    self._order = np.argsort(codes, kind='stable').astype(np.int32)
    self._sorted_codes = codes[self._order]
    # Id -> code point for `decode`; special ids are handled there.
    self._codes = np.concatenate(
        [np.zeros(len(SPECIAL_TOKENS), '<u4'), codes])
    self._codes[UNK_ID] = ord(_REPLACEMENT)

  @classmethod
  def from_texts(cls, texts: Iterable[str]) -> 'CharTokenizer':
    """The tokenizer of every character in `texts`, sorted by code point."""
    seen = set()
    for text in texts:
      seen.update(text)
    return cls(''.join(sorted(seen)))

  @property
  def vocab_size(self) -> int:
    return len(SPECIAL_TOKENS) + len(self.chars)

  def encode(self, text: str) -> np.ndarray:
    """str of n characters -> int32 [n] ids; unknown characters are UNK."""
    codes = np.frombuffer(text.encode('utf-32-le'), '<u4')
    if not len(self.chars):
      return np.full(len(codes), UNK_ID, np.int32)
    where = np.searchsorted(self._sorted_codes, codes)
    where = np.minimum(where, len(self.chars) - 1)
    known = self._sorted_codes[where] == codes
    ids = self._order[where] + len(SPECIAL_TOKENS)
    return np.where(known, ids, UNK_ID).astype(np.int32)

  def decode(self, ids) -> str:
    """int [n] ids -> str; PAD, BOS and EOS are dropped, UNK is U+FFFD."""
    ids = _check_ids(ids, self.vocab_size)
    ids = ids[(ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)]
    return self._codes[ids].tobytes().decode('utf-32-le')

  def to_json(self) -> dict:
    return {'kind': self.kind, 'special_tokens': list(SPECIAL_TOKENS),
            'chars': self.chars}


class ByteTokenizer:
  """One id per UTF-8 byte: byte b is id 4 + b, after the 4 special ids.

  Every text is in the vocabulary (no UNK from `encode`), at the price of
  longer sequences for non-ASCII text. Same interface as CharTokenizer.
  """

  kind = 'byte'
  vocab_size = len(SPECIAL_TOKENS) + 256

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 [n] ids, n the length of its UTF-8 encoding."""
    data = np.frombuffer(text.encode('utf-8'), np.uint8)
    return data.astype(np.int32) + len(SPECIAL_TOKENS)

  def decode(self, ids) -> str:
    """int [n] ids -> str; PAD/BOS/EOS dropped, UNK and broken UTF-8 U+FFFD."""
    ids = _check_ids(ids, self.vocab_size)
    ids = ids[(ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)]
    # 0xFF never occurs in UTF-8, so errors='replace' turns UNK into U+FFFD.
    data = np.where(ids == UNK_ID, 0xFF, ids - len(SPECIAL_TOKENS))
    return data.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def to_json(self) -> dict:
    return {'kind': self.kind, 'special_tokens': list(SPECIAL_TOKENS)}


Tokenizer = CharTokenizer | ByteTokenizer


def _check_ids(ids, vocab_size: int) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f'decode takes a 1-D integer array, got {ids.dtype} '
                     f'{ids.shape}.')
  ids = ids.astype(np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    raise ValueError(f'Ids must be in [0, {vocab_size}), got '
                     f'[{ids.min()}, {ids.max()}].')
  return ids


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
  """Writes the tokenizer as JSON, atomically (a reader never sees half)."""
  temporary = f'{path}.tmp'
  with open(temporary, 'w') as f:
    json.dump(tokenizer.to_json(), f, indent=1)
    f.write('\n')
  os.replace(temporary, path)


def load_tokenizer(path: str) -> Tokenizer:
  """Reads a tokenizer written by `save_tokenizer`; UserError if malformed."""
  try:
    with open(path) as f:
      spec = json.load(f)
    kind = spec['kind']
    specials = tuple(spec['special_tokens'])
    tokenizer = (CharTokenizer(spec['chars']) if kind == 'char'
                 else ByteTokenizer() if kind == 'byte' else None)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise errors.UserError(
        f'Tokenizer file {path} is unreadable ({type(e).__name__}: {e}); '
        'delete it to rebuild it from the training split.') from None
  if tokenizer is None or specials != SPECIAL_TOKENS:
    raise errors.UserError(
        f'Tokenizer file {path} has kind {kind!r} and special tokens '
        f'{specials}; expected a kind in {TOKENIZERS} and {SPECIAL_TOKENS}. '
        'Delete it to rebuild it from the training split.')
  return tokenizer


def build_tokenizer(data_config) -> Tokenizer:
  """The tokenizer `config.data.tokenizer` names, from the TRAINING split.

  For 'char' the vocabulary is every character of `config.data.train_split`,
  so validation and test characters never seen in training become UNK.
  """
  kind = data_config.tokenizer
  if kind == 'byte':
    return ByteTokenizer()
  if kind != 'char':
    raise errors.UserError(
        f'Unknown tokenizer {kind!r} (config.data.tokenizer); use one of '
        f'{TOKENIZERS}.')
  return CharTokenizer.from_texts(
      read_texts(data_config, data_config.train_split))


def load_or_build_tokenizer(data_config, workdir: str | None) -> Tokenizer:
  """The run's tokenizer: WORKDIR/tokenizer.json if there, else built.

  A new tokenizer is built from the training split (`build_tokenizer`) and,
  by process 0, saved as WORKDIR/tokenizer.json, which a resumed run then
  reads back: the ids stay those of the checkpointed embeddings. Every
  process builds the same tokenizer, so none waits for the file.

  Args:
    data_config: `config.data`.
    workdir: the run's directory (must exist), or None to only build.
  """
  path = os.path.join(workdir, TOKENIZER_FILE) if workdir else None
  if path and os.path.exists(path):
    tokenizer = load_tokenizer(path)
    if tokenizer.kind != data_config.tokenizer:
      raise errors.UserError(
          f'{path} holds a {tokenizer.kind!r} tokenizer but '
          f'config.data.tokenizer is {data_config.tokenizer!r}: use another '
          'workdir, or set it back.')
    return tokenizer
  tokenizer = build_tokenizer(data_config)
  if path and jax.process_index() == 0:
    save_tokenizer(tokenizer, path)
  return tokenizer


# ---- Reading splits as token streams -----------------------------------------


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """What models and the trainer need to know about a text dataset.

  An "example" is a window of `seq_len` targets: num_train_examples counts the
  non-overlapping windows of the training stream (what one epoch means),
  num_eval_examples the windows `eval_batches` yields.
  """
  vocab_size: int
  seq_len: int
  num_train_tokens: int
  num_eval_tokens: int
  num_train_examples: int
  num_eval_examples: int


def _prepared_builder(data_config) -> tfds.core.DatasetBuilder:
  """The builder of config.data.name, checked to be prepared, with text.

  Like input_pipeline's, whose helpers it shares so that both pipelines
  report unknown, unprepared or TFRecord datasets in the same words; only the
  feature check differs.
  """
  name, data_dir = data_config.name, data_config.tfds_data_dir
  builder = input_pipeline._builder(name, data_dir)
  with input_pipeline._tfds_errors_only():
    prepared = builder.is_prepared()
  if not prepared:
    raise errors.UserError(
        f'Dataset {name!r} is not prepared in {builder.data_dir_root}: run '
        f'`{input_pipeline._prepare_command(name, data_dir)}`.')
  input_pipeline._check_array_record(builder)
  features = builder.info.features
  key = data_config.text_key
  if key not in features:
    raise errors.UserError(
        f'Dataset {name!r} has no feature {key!r} (config.data.text_key); '
        f'its features are {sorted(features.keys())}.')
  info = features[key].get_tensor_info()
  if info.shape != () or not dtype_utils.is_string(info.np_dtype):
    raise errors.UserError(
        f'Feature {key!r} of dataset {name!r} is {info.np_dtype} {info.shape}; '
        'config.data.text_key must name a scalar string feature.')
  return builder


def read_texts(data_config, split: str) -> list[str]:
  """The documents of `split`, in the dataset's order, as str.

  Raises:
    UserError: the dataset is not prepared, the split or feature does not
      exist.
  """
  builder = _prepared_builder(data_config)
  input_pipeline._num_examples(builder, split)  # Checks the split name.
  source = tfds.data_source(
      data_config.name, split=split, data_dir=data_config.tfds_data_dir,
      download=False)
  return [source[i][data_config.text_key].decode('utf-8')
          for i in range(len(source))]


def token_stream(data_config, split: str, tokenizer: Tokenizer) -> np.ndarray:
  """int32 [N]: the split's documents as [BOS, ids..., EOS], concatenated."""
  pieces = []
  for text in read_texts(data_config, split):
    pieces += [[BOS_ID], tokenizer.encode(text), [EOS_ID]]
  return np.concatenate(pieces or [[]]).astype(np.int32)


def _checked_seq_len(data_config, stream: np.ndarray, split: str) -> int:
  seq_len = data_config.seq_len
  if not isinstance(seq_len, int) or seq_len < 1:
    raise errors.UserError(
        f'config.data.seq_len = {seq_len!r} must be a positive int.')
  if len(stream) < seq_len + 1:
    raise errors.UserError(
        f'config.data.seq_len = {seq_len} is too long for split {split!r} of '
        f'{data_config.name!r} ({len(stream)} tokens, a window needs '
        f'seq_len + 1): lower config.data.seq_len.')
  return seq_len


def _num_eval_windows(num_tokens: int, seq_len: int) -> int:
  # Targets are tokens 1 .. N-1 (token 0 is a BOS nobody predicts).
  return -(-(num_tokens - 1) // seq_len)


def text_info(data_config, tokenizer: Tokenizer) -> TextInfo:
  """Describes config.data's text dataset; raises UserError if unusable."""
  train = token_stream(data_config, data_config.train_split, tokenizer)
  evaluation = token_stream(data_config, data_config.eval_split, tokenizer)
  seq_len = _checked_seq_len(data_config, train, data_config.train_split)
  _checked_seq_len(data_config, evaluation, data_config.eval_split)
  return TextInfo(
      vocab_size=tokenizer.vocab_size,
      seq_len=seq_len,
      num_train_tokens=len(train),
      num_eval_tokens=len(evaluation),
      num_train_examples=(len(train) - 1) // seq_len,
      num_eval_examples=_num_eval_windows(len(evaluation), seq_len),
  )


# ---- Batches -----------------------------------------------------------------


def _lm_batch(stream: np.ndarray, starts: np.ndarray, seq_len: int,
              num_real: int) -> Batch:
  """Windows of `stream` starting at `starts` [n], as an LM batch.

  `stream` must extend at least seq_len + 1 past every start; positions from
  `num_real` on are padding (mask 0).
  """
  positions = starts[:, None] + np.arange(seq_len + 1)
  window = stream[positions]
  targets = window[:, 1:]
  mask = (positions[:, 1:] < num_real) & (targets != BOS_ID)
  return {'inputs': window[:, :-1], 'targets': targets,
          'mask': mask.astype(np.float32)}


def train_window_starts(seed: int, step: int, global_batch_size: int,
                        num_tokens: int, seq_len: int) -> np.ndarray:
  """int64 [B]: where each window of global training batch `step` starts.

  Uniform over [0, num_tokens - seq_len - 1], from a generator seeded by
  (seed, step) alone.
  """
  rng = np.random.default_rng([seed, _WINDOW_STREAM, step])
  return rng.integers(0, num_tokens - seq_len, size=global_batch_size)


def train_batches(data_config, *, tokenizer: Tokenizer, global_batch_size: int,
                  seed: int, start_step: int = 0) -> Iterator[Batch]:
  """Endless next-token batches of random windows of the training stream.

  Batch number `step` is a pure function of (seed, step): its windows start
  at `train_window_starts(seed, step, ...)`. Resuming with `start_step=k`
  yields exactly batches k, k+1, ... of a run from 0.

  Args:
    data_config: `config.data` (name, tfds_data_dir, train_split, text_key,
      seq_len).
    tokenizer: from `load_or_build_tokenizer`.
    global_batch_size: B, the batch summed over all processes.
    seed: non-negative int; the window starts derive from it.
    start_step: the number of the first batch to yield.

  Returns:
    Iterator of {'inputs': int32 [B / P, L], 'targets': int32 [B / P, L]
    (inputs shifted left by one: targets[:, t] == inputs[:, t + 1]),
    'mask': float32 [B / P, L] (0 where the target is BOS)}, for
    P = jax.process_count() and L = config.data.seq_len, this process's
    slice of each global batch. Everything is checked before the first batch.
  """
  stream = token_stream(data_config, data_config.train_split, tokenizer)
  seq_len = _checked_seq_len(data_config, stream, data_config.train_split)
  local = input_pipeline._local_slice(global_batch_size)
  if seed < 0 or start_step < 0:
    raise errors.UserError(
        f'seed ({seed}) and start step ({start_step}) must be non-negative.')

  def load(step: int) -> Batch:
    starts = train_window_starts(
        seed, step, global_batch_size, len(stream), seq_len)
    return _lm_batch(stream, starts[local], seq_len, len(stream))

  return map(load, itertools.count(start_step))


def eval_batches(data_config, *, tokenizer: Tokenizer, global_batch_size: int,
                 split: str | None = None) -> Iterator[Batch]:
  """One pass over an eval split in consecutive, non-overlapping windows.

  Window w holds inputs stream[w L : w L + L] and targets one token later,
  so the W = ceil((N - 1) / L) windows make every token but the first (a BOS)
  a target exactly once. The last window is padded with PAD and mask 0, and
  so are whole padding windows that fill the last global batch (every batch
  has the same shape, so jit compiles once). sum(loss * mask) / sum(mask) is
  the split's exact per-token loss, over its characters and each document's
  EOS.

  Args:
    data_config: `config.data` (name, tfds_data_dir, eval_split, text_key,
      seq_len).
    tokenizer: from `load_or_build_tokenizer`.
    global_batch_size: B, the batch summed over all processes.
    split: the split to read; None means config.data.eval_split.

  Returns:
    Iterator of ceil(W / B) batches {'inputs': int32 [B / P, L], 'targets':
    int32 [B / P, L], 'mask': float32 [B / P, L]}, this process's slice of
    each global batch of windows.
  """
  split = data_config.eval_split if split is None else split
  stream = token_stream(data_config, split, tokenizer)
  seq_len = _checked_seq_len(data_config, stream, split)
  local = input_pipeline._local_slice(global_batch_size)
  num_batches = -(-_num_eval_windows(len(stream), seq_len) //
                  global_batch_size)
  # Pad so that every window of every batch can be sliced; PAD_ID is 0.
  padded = np.zeros(num_batches * global_batch_size * seq_len + 1, np.int32)
  padded[:len(stream)] = stream

  def load(batch_index: int) -> Batch:
    windows = batch_index * global_batch_size + np.arange(
        local.start, local.stop)
    return _lm_batch(padded, windows * seq_len, seq_len, len(stream))

  return map(load, range(num_batches))


# ---- Passages labelled by their work -----------------------------------------
#
# A downstream task for fine-tuning a language model: which work is a passage
# of `seq_len` characters from? Every work of the training split is a class.
# Each work's token stream is cut once: its first (1 - passage_holdout) trains,
# the rest evaluates, so evaluation passages are unseen text of known works.


@dataclasses.dataclass(frozen=True)
class Passages:
  """Each work's training and evaluation token streams (int32 [n_i])."""
  names: tuple[str, ...]
  train: tuple[np.ndarray, ...]
  evaluation: tuple[np.ndarray, ...]
  seq_len: int


def passages(data_config, tokenizer: Tokenizer) -> Passages:
  """The works of config.data.train_split, each cut into train / eval parts.

  Raises UserError if a part of some work is shorter than one passage.
  """
  split = data_config.train_split
  builder = _prepared_builder(data_config)
  input_pipeline._num_examples(builder, split)  # Checks the split name.
  source = tfds.data_source(data_config.name, split=split,
                            data_dir=data_config.tfds_data_dir, download=False)
  holdout, seq_len = data_config.passage_holdout, data_config.seq_len
  if not 0 < holdout < 1:
    raise errors.UserError(f'config.data.passage_holdout = {holdout} must be '
                           'in (0, 1).')
  names, train, evaluation = [], [], []
  for i in range(len(source)):
    record = source[i]
    name = record.get('name', str(i))
    name = name.decode('utf-8') if isinstance(name, bytes) else str(name)
    ids = tokenizer.encode(record[data_config.text_key].decode('utf-8'))
    cut = int(len(ids) * (1 - holdout))
    if min(cut, len(ids) - cut) < seq_len:
      raise errors.UserError(
          f'Work {name!r} is too short for passages of config.data.seq_len = '
          f'{seq_len} with passage_holdout = {holdout}: lower seq_len.')
    names.append(name)
    train.append(ids[:cut].astype(np.int32))
    evaluation.append(ids[cut:].astype(np.int32))
  return Passages(tuple(names), tuple(train), tuple(evaluation), seq_len)


def passage_train_batches(data: Passages, *, global_batch_size: int, seed: int,
                          start_step: int = 0) -> Iterator[Batch]:
  """Endless batches of random training passages, classes drawn uniformly.

  Batch number `step` is a pure function of (seed, step), like every other
  pipeline here; each process takes its slice of the global batch.

  Returns:
    Iterator of {'inputs': int32 [B / P, L], 'label': int32 [B / P]}.
  """
  local = input_pipeline._local_slice(global_batch_size)
  lengths = np.array([len(t) for t in data.train])

  def load(step: int) -> Batch:
    rng = np.random.default_rng([seed, _PASSAGE_STREAM, step])
    labels = rng.integers(0, len(data.names), size=global_batch_size)
    starts = (rng.random(global_batch_size) *
              (lengths[labels] - data.seq_len + 1)).astype(np.int64)
    labels, starts = labels[local], starts[local]
    inputs = np.stack([data.train[w][s:s + data.seq_len]
                       for w, s in zip(labels, starts)])
    return {'inputs': inputs.astype(np.int32), 'label': labels.astype(np.int32)}

  return map(load, itertools.count(start_step))


def passage_eval_batches(data: Passages, *,
                         global_batch_size: int) -> Iterator[Batch]:
  """Every non-overlapping passage of every work's evaluation part, once.

  The last global batch is padded (mask 0), so all batches share one shape.

  Returns:
    Iterator of {'inputs': int32 [B / P, L], 'label': int32 [B / P],
    'mask': float32 [B / P]}.
  """
  windows = [(w, s) for w, stream in enumerate(data.evaluation)
             for s in range(0, len(stream) - data.seq_len + 1, data.seq_len)]
  local = input_pipeline._local_slice(global_batch_size)
  num_batches = -(-len(windows) // global_batch_size)

  def load(batch_index: int) -> Batch:
    rows = batch_index * global_batch_size + np.arange(local.start, local.stop)
    inputs = np.zeros((len(rows), data.seq_len), np.int32)
    labels = np.zeros(len(rows), np.int32)
    mask = (rows < len(windows)).astype(np.float32)
    for i, row in enumerate(rows[rows < len(windows)]):
      w, s = windows[row]
      inputs[i], labels[i] = data.evaluation[w][s:s + data.seq_len], w
    return {'inputs': inputs, 'label': labels, 'mask': mask}

  return map(load, range(num_batches))
