"""fusion_jax.cli: one absl flag declaration per program, parsed in process and under app.run."""
import os
import subprocess
import sys

import pytest
from absl import flags

from fusion_jax import cli
from fusion_jax.convert import export_torch, import_hf, import_torch
from fusion_jax.data import to_arrayrecord
from fusion_jax.synth import __main__ as synth_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_programs_defines_no_global_flags():
  for module in (export_torch, import_hf, import_torch, to_arrayrecord, synth_cli):
    names = cli._declared(module.define_flags)
    assert not set(names) & set(flags.FLAGS), module.__name__


def test_absl_syntax_positional_alias_and_lists():
  a = cli.parse(export_torch.define_flags, ["--shard-size=100KB", "CKPT", "--step", "3", "OUT",
                                            "--allow-incompatible"], export_torch.PROG,
                export_torch.POSITIONAL)
  assert (a.ckpt_dir, a.out_dir, a.shard_size, a.step) == ("CKPT", "OUT", "100KB", 3)
  assert a.allow_incompatible and a.dtype == "float32"
  a = cli.parse(synth_cli.define_flags, ["--out", "o", "--num", "4", "--categories",
                                         "SynthColor,SynthCount", "--nojpeg", "--png-level", "2"],
                synth_cli.PROG)
  assert a.categories == ["SynthColor", "SynthCount"] and not a.jpeg and a.png_level == 2
  # Parsing twice in one process: each parse has its own FlagValues.
  assert cli.parse(synth_cli.define_flags, ["--out", "p", "--num", "1"],
                   synth_cli.PROG).categories == ["all"]


@pytest.mark.parametrize("argv, needle", [
    (["--llm", "l"], "--vision"),                               # required flags
    (["--llm", "l", "--vision", "v", "--preset", "p", "--out", "o", "--seed", "x"], "--seed"),
    (["--llm", "l", "--vision", "v", "--preset", "p", "--out", "o", "extra"], "extra"),
])
def test_bad_command_lines_are_one_line_exit_2(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    import_hf.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and needle in err and err.startswith(import_hf.PROG + ": error:")


def test_mutually_exclusive_sources(capsys):
  with pytest.raises(SystemExit):
    to_arrayrecord.main(["--out", "o", "--mixture", "m.yaml", "--paths", "a.json"])
  assert "mixture" in capsys.readouterr().err


def _import_torch(*argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "fusion_jax.convert.import_torch", *argv],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_as_a_program_under_app_run():
  """`python -m`: flags on absl's FLAGS, --help lists them, positional arguments checked."""
  assert "--tower-config" in _import_torch("--helpshort").stdout
  only_one = _import_torch("SRC")
  assert only_one.returncode == 2 and "expected SRC_DIR OUT_DIR" in only_one.stderr
