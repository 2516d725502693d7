"""The shared start of the command-line scripts (launch/, research/, bench/ where they run JAX).

`run(main)` is absl's `app.run` with the process set up first: the glibc malloc settings of
`malloc_tuning` must be in place before JAX starts its CPU threads, and the persistent compilation
cache (`compile_cache`) is read from the environment when JAX is imported, so scripts import JAX
inside `main` (or after this), never at module level. On a GPU, XLA's allocator may take
`GPU_MEMORY_FRACTION` of the card instead of its default 75% (the environment's
XLA_PYTHON_CLIENT_MEM_FRACTION wins): the 2.6B stage-1 step at 32 samples takes 55 GiB with full
rematerialization and 62 GiB saving q, k, v and the attention output, over 75% of an 80 GB H100
less remat auto's headroom (docs/performance.md, "The step compiled for a Hopper GPU").

`kill -USR1 <pid>` makes a running script print every thread's Python stack to its stderr and go
on: where a host of a stuck pod run waits (a step's collective, a checkpoint barrier, the loader).
A thread of its own prints them, woken by the byte that Python's C-level signal handler writes to
its wakeup file descriptor in whichever thread the signal reaches. So the stacks also come while
the main thread is blocked inside XLA, where a Python handler would wait for it to return, and
whatever thread the kernel picks (one started before the script's start, as OpenBLAS's threads
are, would not block a signal that the others block). The thread prints holding the interpreter's
lock: `faulthandler.register` prints from inside the signal handler, walking the threads without
the lock, and crashed processes (SIGSEGV) when a thread ended during the walk.

`run` also reports bad input in one line on stderr and exit status 2, never a traceback: a flag
absl refuses, a config file that does not exist, an unknown `--config.x.y` field (with the nearest
known one), a config variant that raises an `input_errors.InputError`, and, from `main`, an
`InputError` or absl's `app.UsageError`. Ctrl-C is one line too (exit 130). Every other
exception keeps its traceback (exit 1): it is a bug.
"""
from __future__ import annotations

import difflib
import faulthandler
import os
import re
import signal
import sys
import threading
from typing import Callable, NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path
# Public names that the package's __init__ leaves out.
from ml_collections.config_flags.config_flags import ConfigFileFlagParser, is_config_flag

from svg_jax import compile_cache, input_errors, malloc_tuning

# The rest of the card holds the CUDA context, cuDNN's workspaces and NCCL's buffers.
GPU_MEMORY_FRACTION = "0.92"
STACKS_SIGNAL = signal.SIGUSR1


def print_stacks_on_signal() -> None:
  """Every thread's stack to stderr on STACKS_SIGNAL, unless a handler of its own is installed.
  Call it from the main thread; it takes Python's signal wakeup file descriptor, unless another
  is set (then the main thread prints, when it next runs Python)."""
  if signal.getsignal(STACKS_SIGNAL) != signal.SIG_DFL:  # the default would end the process
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)  # a flood of signals drops bytes instead of blocking
  previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  if previous != -1:  # not ours to take: give it back
    signal.set_wakeup_fd(previous)
    os.close(read_fd)
    os.close(write_fd)
    signal.signal(STACKS_SIGNAL, lambda *_: _print_stacks())
    return
  signal.signal(STACKS_SIGNAL, lambda *_: None)  # the signal reaches the descriptor
  threading.Thread(target=_print_stacks_on_each_signal, args=(read_fd,), name="stacks-on-signal",
                   daemon=True).start()


def _print_stacks() -> None:
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def _print_stacks_on_each_signal(read_fd: int) -> None:
  while True:
    if STACKS_SIGNAL in os.read(read_fd, 512):  # signal numbers, one byte each
      _print_stacks()


def bad_input_exit(line: str, *, started: bool = True) -> NoReturn:
  """Prints `line` (made one line) to stderr and exits with status 2. `started`: JAX may run
  several processes by now, so this one leaves without waiting for the others
  (`process_exit`)."""
  line = " ".join(line.split())
  print(line, file=sys.stderr)
  if started:
    from svg_jax import process_exit  # imports JAX: only after run's set-up
    process_exit.exit_process(2, line)
  sys.exit(2)


def define_config_file(name: str, default: str | None, help_string: str):
  """`config_flags.DEFINE_config_file`, locked (an override must name an existing field). With a
  default file, config_flags reads it and the command line's `--<name>.x` overrides right here
  (unless the command line names a file), so an unknown field is reported here."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, lock_config=True)
  except (AttributeError, KeyError):  # ConfigDict's answer to an unknown field
    _exit_on_unknown_field(name, default, sys.argv)
    raise


def read_config_file(spec: str, name: str = "config", overrides: dict | None = None):
  """The config of `spec` (file[:argument]) as a `--<name>` config flag reads it (config_flags'
  parser, locked), with `overrides` ({"a.b": value}, as `config_flags.get_override_values` gives a
  parsed flag's) set: for a script that reads configs besides the one its flag names
  (bench/loader.py's, the variants of launch/aot_compile.py --fit). A file that does not exist,
  or an `input_errors.InputError` of the config file (a bad variant), raises one line."""
  path = spec.split(":")[0]
  if not os.path.isfile(path):
    raise input_errors.MissingInput(f"config file {path} does not exist")
  try:
    config = ConfigFileFlagParser(name).parse(spec)
  except input_errors.InputError as e:  # config_flags raises it again with the traceback in it
    raise _root_cause(e) from None
  for field, value in (overrides or {}).items():
    config_path.set_value(field, config, value)
  return config


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with bad flags and config files as one line and exit status 2 (the
  module docstring); the flags_parser of `run`."""
  for name in _config_flag_names():
    path = (_given_config_file(name, argv) or "").split(":")[0]
    if path and not os.path.isfile(path):  # config_flags would raise at the config's first use
      bad_input_exit(f"config error: config file {path} (--{name}) does not exist", started=False)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    root = _root_cause(e)
    if isinstance(root, input_errors.InputError):  # raised by a config file, e.g. a variant
      bad_input_exit(f"config error: {root}", started=False)
    failed = re.match(r"flag --([^=]+)=", str(e))
    if (failed and failed.group(1) in _config_flag_names()
        and not isinstance(root, flags.Error)):  # a config file that failed otherwise: a traceback
      raise
    # absl gives a line per bad flag (several required flags missing): one line of them all.
    bad_input_exit("flag error: " + "; ".join(line.rstrip(".") for line in str(e).splitlines()),
                   started=False)
  except (AttributeError, KeyError):  # ConfigDict's answer to an unknown field
    for name in _config_flag_names():
      _exit_on_unknown_field(name, _given_config_file(name, argv), argv)
    raise


def _root_cause(error: BaseException) -> BaseException:
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  return error


def _config_flag_names() -> list[str]:
  return [name for name in flags.FLAGS if is_config_flag(flags.FLAGS[name])]


def _given_config_file(name: str, argv: list[str]) -> str | None:
  """The `--<name>` value on the command line (a default file is checked where it is defined)."""
  for i, arg in enumerate(argv):
    if re.fullmatch(rf"--?{re.escape(name)}", arg) and i + 1 < len(argv):
      return argv[i + 1]
    if re.match(rf"--?{re.escape(name)}=", arg):
      return arg.split("=", 1)[1]
  return None


def _exit_on_unknown_field(name: str, config_file: str | None, argv: list[str]) -> None:
  """If an override `--<name>.a.b=...` in argv names no field of `config_file`'s config: its one
  line and exit 2 (with the nearest field of its section, as ConfigDict suggests one)."""
  if config_file is None:
    return
  config = ConfigFileFlagParser(name).parse(config_file)  # without the overrides
  for arg in argv[1:]:
    match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
    if not match:
      continue
    node, parts = config, match.group(1).split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      near = difflib.get_close_matches(part, known, n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      bad_input_exit(f"config error: unknown config field {'.'.join(parts[:i + 1])!r}{hint}, "
                     f"given as {arg.split('=')[0]}; the config is locked, so fields must exist "
                     "in svg_jax/config.py or the config file", started=False)


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a job Ctrl-C ended


def run(main: Callable, *, interrupted: str = "interrupted (Ctrl-C)", **kwargs) -> None:
  """absl's `app.run(main)` with the set-up and the one-line errors of the module docstring;
  Ctrl-C prints `interrupted` (what is kept, how to go on) and exits with status 130."""
  def tuned_main(argv):
    malloc_tuning.tune()
    print_stacks_on_signal()
    compile_cache.enable_default()
    # Read when the GPU backend starts (the first device query), not when JAX is imported.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION)
    try:
      return main(argv)
    except input_errors.InputError as e:
      bad_input_exit(f"{e.kind}: {e}")
    except app.UsageError as e:  # absl would print the whole usage text
      bad_input_exit(f"usage error: {e}")
    except KeyboardInterrupt as e:  # a traceback through whatever ran says nothing to a user
      line = " ".join(f"{interrupted} {e}".split())
      print(line, file=sys.stderr)
      from svg_jax import process_exit  # imports JAX: only after run's set-up
      process_exit.exit_process(EXIT_INTERRUPTED, line)

  app.run(tuned_main, flags_parser=parse_flags, **kwargs)
