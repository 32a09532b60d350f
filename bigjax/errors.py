"""The one exception type that reaches users as a single line."""


class UserError(Exception):
  """Bad input from the user: a config, a flag, missing data, a workdir.

  The message is one line that names what is wrong and how to fix it. Entry
  points print it without a traceback and exit non-zero. Raise it before any
  compute starts and before anything in a workdir is written.
  """
