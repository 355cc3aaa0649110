"""benchmarks/step_mfu.py runs end to end on CPU at tiny shapes (FUSION step + torch baseline)."""
import gzip
import json

from experiment_helpers import load_benchmark


def _module():
  return load_benchmark("step_mfu")


def test_tiny_run_writes_the_table_json(tmp_path, capsys):
  out = tmp_path / "mfu.json"
  mod = _module()
  report = mod.measure(mod.parse_args(["--tiny", "--layers", "1", "--vision-layers", "2",
                                       "--steps", "1", "--dtype", "float32", "--loss-chunks", "2",
                                       "--out", str(out),
                                       "--hlo", str(tmp_path / "hlo")]))
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
  assert report["loss_chunks"] == 2
  assert "fusion unpacked | cpu |" in capsys.readouterr().out
  with gzip.open(tmp_path / "hlo" / "unpacked.hlo.txt.gz", "rt") as f:
    assert f.read().startswith("HloModule")


def test_kernel_breakdown_by_class():
  mod = _module()
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
           "args": {"name": "Stream #14(Memset,Compute,MemcpyD2D)"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8,
           "args": {"name": "Stream #67(MemcpyD2D)"}}]
  kernels = [("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 0, 4000),
             ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 4000, 2000),
             ("nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 6000, 6000),
             ("gemm_fusion_dot_251", 12000, 2000), ("loop_add_fusion_21", 16000, 4000)]
  events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": ts, "dur": d}
                   for n, ts, d in kernels]
  events.append({"ph": "X", "pid": 1, "tid": 8, "name": "MemcpyD2D", "ts": 0, "dur": 9000})
  events.append({"ph": "X", "pid": 2, "tid": 1, "name": "gemm on host", "ts": 0, "dur": 9000})
  ms = mod.events_breakdown(events, steps=2)
  assert ms == {"attention backward": 2.0, "attention forward": 1.0, "matmul": 4.0,
                "other (elementwise, norms, copies)": 2.0, "busy": 9.0, "span": 10.0}
  assert mod.events_breakdown(meta[1:2], steps=1) is None  # no accelerator: no breakdown
  events.append({"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion_21", "ts": 20000,
                 "dur": 1000})
  events[len(meta) + 2]["args"] = {"hlo_op": "custom-call.7"}  # the profiler's annotation
  top = mod.top_kernels(events, steps=2, n=2)
  assert top == [{"name": "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", "kernel_class": "matmul",
                  "ms": 3.0, "calls": 0.5, "hlo_op": "custom-call.7"},
                 {"name": "loop_add_fusion_21", "kernel_class": "other (elementwise, norms, "
                  "copies)", "ms": 2.5, "calls": 1.0, "hlo_op": None}]
  hlo = ("HloModule jit_step\n"
         '  %custom-call.7 = bf16[8]{0} custom-call(%p), metadata={op_name="jit(step)/jvp(Fusion)'
         '/Fusion._forward/Fusion.encode_images/vision_tower.features/while/body/mlp/dot"}\n'
         '  %loop_add_fusion.21 = f32[8]{0} fusion(%a, %b), kind=kLoop, metadata={op_name='
         '"jit(step)/transpose(jvp(Fusion))/Fusion._forward/llm/llm._segments/while/body/'
         'groups/block/cross_attn/add"}\n')
  ops = mod.hlo_op_names(hlo)
  assert mod.part_breakdown(mod.top_kernels(events, steps=2), ops) == {
      "tower": 3.0, "interaction layers": 2.5, "unattributed": 4.0}
  # Inside a CUDA command buffer the profiler names the buffer; the kernel's own name is the
  # fusion's.
  in_buffer = [{"name": "loop_add_fusion_21", "ms": 1.5, "hlo_op": "command_buffer_3"}]
  assert mod.part_breakdown(in_buffer, ops) == {"interaction layers": 1.5}
  line = mod.kernels_line("fusion unpacked", ms)
  assert line == ("fusion unpacked, kernels per step: matmul 4.0 ms, attention backward 2.0 ms, "
                  "other (elementwise, norms, copies) 2.0 ms, attention forward 1.0 ms "
                  "(busy 9.0 of 10.0 ms)")


def test_partial_remat_policy_reports_no_hfu():
  mod = _module()
  a = mod.parse_args(["--tiny", "--remat", "save_qkv_attn_mlp"])
  cfg = mod.model_config(a)
  assert cfg.llm.remat_policy == cfg.vision.remat_policy == "save_qkv_attn_mlp"
  assert all(v["remat"] is None and v["model"] > 0 for v in mod.step_flops(a, cfg).values())
  full = mod.parse_args(["--tiny"])
  assert all(v["remat"] > 0 for v in mod.step_flops(full, mod.model_config(full)).values())
  run = dict(step_s=0.5, devices=1, device="NVIDIA H200", real_tokens=100)
  fig = mod.figures(run, {"model": 2e14, "remat": None}, tokens=100)  # recompute unknown
  assert fig["mfu"] == 2e14 / 0.5 / 989e12 and fig["hfu"] is None
  assert fig["hardware_tflop"] is None
  assert mod.figures(run, {"model": 2e14, "remat": 1e14}, tokens=100)["hfu"] == 3e14 / 0.5 / 989e12
