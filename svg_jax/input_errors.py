"""Errors in what a user gave: a flag, a config field or file, a file or folder one names, the
data in it. The scripts print such an error as one line and exit with status 2 (`cli.run`); any
other exception is a bug and keeps its traceback. Raise one where the input is found wrong, with a
message on one line that names the input and says what is wrong with it.

The classes subclass the built-in types callers already catch (ValueError, FileNotFoundError)."""


class InputError(ValueError):
  """Bad input or config; the message is one line, printed after `kind`."""
  kind = "input error"


class MissingInput(InputError, FileNotFoundError):
  """A file or folder that the user named does not exist."""


def found_in(error: BaseException) -> InputError | None:
  """The InputError that `error` is or was raised from (its __cause__ / __context__ chain), or
  None: a data error raised inside a loader may reach the caller wrapped by the loader's own."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, InputError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None
