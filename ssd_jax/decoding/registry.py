"""The decoding methods: each declares itself in one module under methods/.

A method is a `Method`: its name, whether it is lossless, the trained stages it needs
beyond the backbone (heads, hawk_draft, ...), its options (a frozen dataclass whose fields
carry their doc, see `option`, with `validate(bundle)`), and its builder

  build(bundle, target, options) -> fn(params, labels [B], keys [B]) -> (tokens [B, N], stats)

where params = {'ar': backbone params, <each needed stage>: its params} (the tokenizer's
codebook enters as a constant instead, see codebook.py), and the size of the block one
target pass feeds, `block_tokens(options, grid)`. The engine, the
CLI and the benchmark read these declarations and name no method. To add one, write
methods/<file>.py defining METHODS = (Method(...),) and add the file's name to MODULES.
"""

import dataclasses
import functools
import importlib
from typing import Callable

# The modules under ssd_jax/decoding/methods/, in the order --help lists their methods.
MODULES = ('ar', 'speculative', 'ssd', 'jacobi', 'lantern', 'zipar', 'hawk', 'mulo')


def option(default, doc, choices=None):
  """A field of a method's options: its default, a one-line doc (--help), allowed values."""
  return dataclasses.field(default=default, metadata={'doc': doc, 'choices': choices})


class OptionError(ValueError):
  """A bad option value; the registry names the flag it came from."""

  def __init__(self, field, value, requirement):
    super().__init__(f'{field}={value!r} {requirement}')
    self.field, self.value, self.requirement = field, value, requirement


@dataclasses.dataclass(frozen=True)
class NoOptions:
  """A method without knobs."""

  def validate(self, bundle):
    del bundle


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  summary: str        # one line for --help
  lossless: bool      # greedy equals AR, sampled distribution equals the target's
  needs: tuple        # stages besides tokenizer/ and ar/ (train.py stage names)
  options: type       # frozen dataclass of the knobs, fields made with `option`
  build: Callable     # (bundle, target, options) -> fn(params, labels, keys)
  # (options, grid) -> tokens per sample one target pass of the loop feeds: the block it
  # verifies (speed_bench.py times a bare forward of that many tokens as the floor).
  block_tokens: Callable

  def flag(self, field):
    """The command-line flag of an option field: --<method>_<field>."""
    return f'{self.name}_{field}'

  def make_options(self, **values):
    """Options from field values (unknown fields refused), checked without a bundle."""
    known = [f.name for f in dataclasses.fields(self.options)]
    for key in values:
      if key not in known:
        raise ValueError(f'method {self.name!r} has no option {key!r}; its options are '
                         f'{", ".join(known) or "none"}.')
    return self.options(**values)

  def validate(self, options, bundle=None):
    """Runs options.validate(bundle); a bad value is reported as --<method>_<field>=..."""
    if not isinstance(options, self.options):
      raise TypeError(f'method {self.name!r} takes {self.options.__name__}, not '
                      f'{type(options).__name__}.')
    try:
      options.validate(bundle)
    except OptionError as e:
      raise ValueError(f'--{self.flag(e.field)}={e.value!r} {e.requirement}') from None
    return options


def check(condition, field, value, requirement):
  """Raises OptionError(field, value, requirement) unless condition."""
  if not condition:
    raise OptionError(field, value, requirement)


def fields(method):
  """[(field name, default, doc, choices)] of a method's options, in declaration order."""
  return [(f.name, f.default, f.metadata.get('doc', ''), f.metadata.get('choices'))
          for f in dataclasses.fields(method.options)]


@functools.cache
def _table():
  table = {}
  for module_name in MODULES:
    module = importlib.import_module(f'ssd_jax.decoding.methods.{module_name}')
    for method in module.METHODS:
      if method.name in table:
        raise ValueError(f'method {method.name!r} is declared twice (in {module_name}).')
      table[method.name] = method
  return table


def get(name):
  table = _table()
  if name not in table:
    raise ValueError(f'unknown method {name!r}; choose one of {", ".join(table)}.')
  return table[name]


def names():
  return tuple(_table())


def all_methods():
  return tuple(_table().values())
