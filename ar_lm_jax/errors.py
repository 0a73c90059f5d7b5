"""The one error type for bad input, which the command line maps to one line and exit code 2."""


class UserError(ValueError):
  """Bad input (a flag, a config key, a file, a checkpoint that does not fit): the command line prints
  `error: <message>` on one line and exits 2 (`cli.run_main`), never a traceback. Every error of the
  library that means "the input is wrong, nothing ran" subclasses it, so no entry point translates one
  error into another."""
