"""Command lines from declarations: flags made from dataclass fields, errors in one line.

A script declares its arguments once, as a dataclass whose fields carry their doc
(`arg(default, doc)`); the decoding methods declare their knobs in their options
(ssd_jax/decoding/registry.py) and reach the command line as --<method>_<field>. A bad
flag or value ends the script with one line naming it and exit code 2, never a help dump
or a traceback; `--help` lists everything.
"""

import dataclasses
import os
import sys
import tempfile
import typing

from absl import app
from absl import flags

from ssd_jax.decoding import registry

FLAGS = flags.FLAGS
EXIT_USAGE = 2


def arg(default, doc, choices=None):
  """A script argument: its default and one line for --help."""
  return dataclasses.field(default=default, metadata={'doc': doc, 'choices': choices})


def _base_type(annotation):
  """int / float / str / bool / list from a resolved annotation (typing.get_type_hints;
  Optional[...] unwrapped)."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  if typing.get_origin(annotation) is typing.Union and len(args) == 1:
    annotation = args[0]
  if typing.get_origin(annotation) in (list, tuple, typing.Sequence) or annotation in (
      list, tuple):
    return list
  return annotation


def _define(name, default, doc, kind, choices=None):
  if choices:
    flags.DEFINE_enum(name, default, list(choices), doc)
  elif kind is bool:
    flags.DEFINE_bool(name, default, doc)
  elif kind is int:
    flags.DEFINE_integer(name, default, doc)
  elif kind is float:
    flags.DEFINE_float(name, default, doc)
  elif kind is list:
    flags.DEFINE_list(name, default, doc)
  else:
    flags.DEFINE_string(name, default, doc)


def define_flags(cls, skip=()):
  """One flag per field of the dataclass `cls` (not those in `skip`); their names.

  The script declares them key flags (flags.declare_key_flag), so its --help lists them.
  """
  hints = typing.get_type_hints(cls)
  names = []
  for f in dataclasses.fields(cls):
    if f.name not in skip and f.metadata:
      _define(f.name, f.default, f.metadata.get('doc', ''), _base_type(hints[f.name]),
              f.metadata.get('choices'))
      names.append(f.name)
  return names


def define_method_flags():
  """--<method>_<field> for every option of every registered method; their names."""
  names = []
  for method in registry.all_methods():
    hints = typing.get_type_hints(method.options)
    for name, default, doc, choices in registry.fields(method):
      _define(method.flag(name), default, f'{method.name}: {doc}', _base_type(hints[name]),
              choices)
      names.append(method.flag(name))
  return names


def read(cls, **overrides):
  """The dataclass `cls` filled from the parsed flags of its fields (and `overrides`)."""
  values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(cls) if f.name in FLAGS}
  values.update(overrides)
  return cls(**values)


def method_options(method_name):
  """{field: value} of the options given on the command line for `method_name`.

  A knob of another method is refused: it would be silently ignored.
  """
  chosen = registry.get(method_name)
  for method in registry.all_methods():
    for name, *_ in registry.fields(method):
      flag = method.flag(name)
      if method is not chosen and FLAGS[flag].present:
        raise ValueError(f'--{flag} is an option of method {method.name!r}, not of '
                         f'--method={chosen.name}; drop it or choose --method={method.name}.')
  return {name: FLAGS[chosen.flag(name)].value for name, *_ in registry.fields(chosen)}


def check_writable(path, flag, folder=False):
  """Refuses an output path that cannot be written, before any work starts.

  Creates the missing folders and writes (and removes) a probe file there.
  """
  if not path:
    return
  directory = path if folder else (os.path.dirname(os.path.abspath(path)) or '.')
  if not folder and os.path.isdir(path):
    raise ValueError(f'--{flag}={path} is a folder; give a file path.')
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise ValueError(f'--{flag}={path} cannot be written ({e.strerror}: {directory}); '
                     'choose another path.') from None


def fail(message):
  """Ends the script: one line on stderr, exit code 2."""
  script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'ssd_jax'
  first = str(message).strip().splitlines()[0] if str(message).strip() else 'bad usage'
  sys.stderr.write(f'{script}: error: {first} (see --help)\n')
  sys.exit(EXIT_USAGE)


def _parse(argv):
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message:  # an error inside a config file: keep its last line
      message = f'{message.split(": ")[0]}: {message.strip().splitlines()[-1]}'
    fail(message)
  except AttributeError as e:  # config_flags' answer to --config.<a field it lacks>=...
    fail(f'a --config.* flag names a field the config does not have: {str(e).strip(chr(34))}')
  if len(rest) > 1:
    fail(f'unexpected arguments: {" ".join(rest[1:])}')
  return rest


def _raised_by_us(error):
  """Whether the innermost frame of the error is this project's code (a refusal of bad
  input, phrased for the user) rather than a library's (a bug: keep the traceback)."""
  tb = error.__traceback__
  while tb.tb_next is not None:
    tb = tb.tb_next
  path = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return path.startswith(_PROJECT_ROOT + os.sep) and os.sep + 'site-packages' not in path


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(main):
  """app.run(main) with one-line errors: flag errors, and the ValueError /
  FileNotFoundError with which this project refuses bad input."""

  def guarded(argv):
    try:
      return main(argv)
    except (ValueError, FileNotFoundError) as e:
      if not _raised_by_us(e):
        raise
      fail(e)

  app.run(guarded, flags_parser=_parse)
