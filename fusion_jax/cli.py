"""One command-line style for fusion_jax's programs: absl flags, declared once by a function.

A program declares its flags in `define_flags(fv: flags.FlagValues)` (DEFINE_*(...,
flag_values=fv)) and does its work in a plain function of the parsed values. It is entered in
two ways from that one declaration:

  * `python -m fusion_jax.X ...`: `app_main(define_flags, body, prog)` defines the flags on
    absl's global FLAGS and runs `body` under absl.app.run (--help, --helpfull, --flagfile and
    absl's logging flags come with it);
  * in process (tests, fusion_jax.run): `parse(define_flags, argv, prog)` parses a list of
    arguments into a private FlagValues. absl's FLAGS is process-global and a second DEFINE of
    a name raises DuplicateFlagError, so importing a program's module defines nothing and any
    number of programs can be parsed in one process.

Both return an attribute namespace of the values, a flag named `shard-size` read as
`args.shard_size` (the usual Python spelling), plus the positional arguments under the names the program gives them.
absl syntax: `--flag value`, `--flag=value`, `--flag` / `--noflag` for booleans, lists as
`--flag a,b,c`; flags and positional arguments may come in any order.
"""
from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags

DefineFlags = Callable[[flags.FlagValues], None]


def usage_error(prog: str, msg: str) -> NoReturn:
  """One line naming the program and the problem on stderr; exit status 2 (a usage error)."""
  print(f"{prog}: error: {msg}", file=sys.stderr)
  raise SystemExit(2)


def _namespace(fv: flags.FlagValues, names: Sequence[str], rest: Sequence[str],
               positional: Sequence[str], prog: str) -> types.SimpleNamespace:
  """The values of `names` in fv plus `rest` bound to `positional`."""
  if len(rest) != len(positional):
    want = " ".join(p.upper() for p in positional) or "no positional arguments"
    got = " ".join(rest) or "none"
    usage_error(prog, f"expected {want}; got {got} (see --help)")
  values: dict[str, Any] = {n.replace("-", "_"): fv[n].value for n in names}
  values.update(zip(positional, rest))
  return types.SimpleNamespace(**values)


def _declared(define: DefineFlags) -> list[str]:
  """The flag names `define` declares (aliases included)."""
  fv = flags.FlagValues()
  define(fv)
  return list(fv)


def parse(define: DefineFlags, argv: Sequence[str] | None, prog: str,
          positional: Sequence[str] = ()) -> types.SimpleNamespace:
  """argv (the arguments, without the program name; None: sys.argv[1:]) parsed by the flags
  `define` declares, into a private FlagValues. Bad input: one line, SystemExit(2)."""
  fv = flags.FlagValues()
  define(fv)
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest = fv([prog, *argv])[1:]
  except flags.Error as e:
    usage_error(prog, str(e))
  return _namespace(fv, list(fv), rest, positional, prog)


def app_main(define: DefineFlags, body: Callable[[types.SimpleNamespace], int | None],
             prog: str, positional: Sequence[str] = ()) -> None:
  """Runs `body(args)` as the program, under absl.app.run with the flags on absl's FLAGS; its
  return value is the exit status."""
  define(flags.FLAGS)
  names = _declared(define)

  def main(argv: list[str]) -> int | None:
    return body(_namespace(flags.FLAGS, names, argv[1:], positional, prog))

  app.run(main)
