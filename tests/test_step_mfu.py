"""benchmarks/step_mfu.py runs end to end on CPU at tiny shapes (FUSION step + torch baseline)."""
import json

from experiment_helpers import load_benchmark


def _module():
  return load_benchmark("step_mfu")


def test_tiny_run_writes_the_table_json(tmp_path, capsys):
  out = tmp_path / "mfu.json"
  mod = _module()
  report = mod.measure(mod.parse_args(["--tiny", "--layers", "1", "--vision-layers", "2",
                                       "--steps", "1", "--dtype", "float32", "--out", str(out)]))
  assert json.loads(out.read_text())["runs"].keys() == report["runs"].keys()
  fusion, torch = report["runs"]["fusion unpacked"], report["runs"]["torch Phi3 baseline"]
  for run in (fusion, torch):
    assert run["step_s"] > 0 and run["tokens_per_s"] > 0 and run["model_tflop"] > 0
    assert run["mfu"] is None  # CPU: no peak in the table
  assert fusion["tokens_per_s_vs_torch"] > 0
  assert fusion["f32_scores_in_hlo"]  # the XLA path on CPU materialises the scores
  # The packed run either ran or says why not (the model may not consume packed rows yet).
  packed = report["runs"]["fusion packed"]
  assert "step_s" in packed or packed["skipped"]
  assert 0 < report["fusion_flops_share"]["unpacked"] < 1
  assert report["llm_layers"] == 1 and report["preset_llm_layers"] == 4
  assert "fusion unpacked | cpu |" in capsys.readouterr().out
