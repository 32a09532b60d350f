"""Flag parsing shared by the entry points: every user error is one line.

ml_collections' config flags reject unknown keys and wrong types, but with a
long traceback. Here the config file is loaded first without overrides, each
`--config.KEY=VALUE` is checked against the declared keys (with the closest
valid key for a typo), and only then are the overrides applied.
"""

import difflib
import os
import sys

import logging as py_logging

from absl import flags
from absl import logging
from ml_collections import config_flags

import bigjax
from bigjax import config_files
from bigjax.errors import UserError
import experiments

EXIT_USER_ERROR = 2


def fail(message: str) -> None:
  """Prints `message` as one line on stderr and exits with EXIT_USER_ERROR."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


class _OwnInfoOnly(py_logging.Filter):
  """Keeps warnings from everyone, but INFO lines only from bigjax itself.

  Orbax, TFDS and JAX log dozens of INFO lines per checkpoint or dataset
  open, which would bury the run's own progress.
  """

  # Our own package folders, exactly: a substring test would also match a
  # checkout that happens to be named 'bigjax', site-packages included.
  OWN = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
              for m in (bigjax, experiments))

  def filter(self, record):
    return (record.levelno >= py_logging.WARNING
            or os.path.abspath(record.pathname).startswith(self.OWN))


def log_own_info_only() -> None:
  """INFO logging for bigjax's own messages; warnings and errors for all."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def _overrides(argv, flag_name):
  """(key, argument) for each `--FLAG.KEY[=VALUE]` in argv."""
  out = []
  for arg in argv[1:]:
    for dashes in ('--', '-'):
      head = f'{dashes}{flag_name}.'
      if arg.startswith(head):
        out.append((arg[len(head):].split('=', 1)[0], arg))
        break
  return out


def _load_config(flag_values, flag_name):
  try:
    return getattr(flag_values, flag_name)
  except Exception as e:  # The config file's own code can raise anything.
    raise UserError(f'could not load --{flag_name}: {_one_line(e)}') from e


def _config_alone(argv, flag_name):
  """The config that `--FLAG=FILE` in argv names, loaded without overrides.

  Uses a FlagValues of its own: the global one defines a flag per config key
  while parsing, and a second parse would define them twice.
  """
  values = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag_name}='):
      values.append(arg.split('=', 1)[1])
    elif arg == f'--{flag_name}' and i + 1 < len(argv):
      values.append(argv[i + 1])
  if not values:
    raise UserError(f'--{flag_name}=configs/NAME.py is required')
  path = values[-1].split(':', 1)[0]
  if not os.path.isfile(path):
    raise UserError(f"config file '{path}' (--{flag_name}) does not exist; "
                    'the configs are in configs/')
  own = flags.FlagValues()
  config_flags.DEFINE_config_file(flag_name, flag_values=own)
  alone = [argv[0], f'--{flag_name}={values[-1]}']
  # config_flags looks for overrides in sys.argv itself, not only in the
  # argv it is given: hide them for this parse.
  saved, sys.argv = sys.argv, alone
  try:
    own(alone)
    return getattr(own, flag_name)
  except Exception as e:  # The config file's own code can raise anything.
    raise UserError(f'could not load --{flag_name}={values[-1]}: '
                    f'{_one_line(e)}') from e
  finally:
    sys.argv = saved


def _one_line(e: BaseException) -> str:
  """The gist of an exception: the last line of its innermost cause.

  config_flags wraps errors raised inside config files with the whole
  traceback as text; its last line is the original error.
  """
  while e.__cause__ is not None:
    e = e.__cause__
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def parse_flags(argv, *, config_flag='config'):
  """absl `flags_parser` for app.run: parses argv, exiting with one line on error."""
  if any(a.split('=')[0] in ('--help', '--helpfull', '-h', '--helpshort')
         for a in argv[1:]):
    return flags.FLAGS(argv)  # absl prints the help and exits.
  try:
    known = config_files.key_paths(_config_alone(argv, config_flag))
    for key, arg in _overrides(argv, config_flag):
      if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = (f"; did you mean '{close[0]}'?" if close
                else '; see the config file for the keys it declares')
        raise UserError(f"unknown config key '{key}' in {arg}{hint}")
    rest = flags.FLAGS(argv)
    _load_config(flags.FLAGS, config_flag)
    return rest
  except UserError as e:
    fail(str(e))
  except flags.Error as e:
    # Wrong types ("flag --config.batch_size=abc: invalid literal for int()"),
    # unknown flags, missing required flags.
    fail(f'{_one_line(e)}; see --helpfull')
