"""The GKE launch path: launch/gke_xpk.sh fills launch/gke_tpu_jobset.yaml for a Cloud TPU slice
name; the JobSet parses and runs the trainer's multi-host command on one pod per TPU host.
Also the jax.distributed environment variables the trainer reads (fusion_jax.parallel.distributed).
"""
import math
import os
import re
import shlex
import subprocess

import pytest
import yaml

from fusion_jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "gke_xpk.sh")


def _script(*args, **env):
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **env})


@pytest.mark.parametrize("tpu_type, accel, topology, hosts", [
    ("v5p-128", "tpu-v5p-slice", "4x4x4", 16),
    ("v6e-64", "tpu-v6e-slice", "8x8", 16),
    ("v5litepod-256", "tpu-v5-lite-podslice", "16x16", 64),
])
def test_jobset_for_a_slice(tpu_type, accel, topology, hosts):
  p = _script("jobset", tpu_type, "experiments/fusion_3b.py:stage1", "gs://bucket/run",
              "--config.data.image_root=/data/my images", IMAGE="reg/fusion:1",
              JOB_NAME="fusion-3b-stage1")
  assert p.returncode == 0, p.stderr
  js = yaml.safe_load(p.stdout)
  assert js["kind"] == "JobSet" and js["apiVersion"].startswith("jobset.x-k8s.io/")
  assert js["metadata"]["name"] == "fusion-3b-stage1"
  (rjob,) = js["spec"]["replicatedJobs"]
  assert rjob["replicas"] == 1  # one slice
  job = rjob["template"]["spec"]
  assert job["parallelism"] == job["completions"] == hosts  # one pod per TPU host
  assert job["backoffLimit"] == 0
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accel,
                                 "cloud.google.com/gke-tpu-topology": topology}
  (container,) = pod["containers"]
  chips = container["resources"]["limits"]["google.com/tpu"]
  assert chips == 4
  assert hosts * chips == math.prod(int(d) for d in topology.split("x"))  # every chip
  assert container["image"] == "reg/fusion:1"
  assert container["command"] == ["bash", "-c"]
  argv = shlex.split(container["args"][0])
  assert argv[:4] == ["python", "-m", "fusion_jax.train", "--multihost=true"]
  assert argv[4:] == ["--config", "experiments/fusion_3b.py:stage1", "--workdir",
                      "gs://bucket/run", "--config.data.image_root=/data/my images"]


def test_template_placeholders_are_documented_and_filled():
  with open(os.path.join(ROOT, "launch", "gke_tpu_jobset.yaml")) as f:
    text = f.read()
  body = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
  header = "\n".join(l for l in text.splitlines() if l.lstrip().startswith("#"))
  names = set(re.findall(r"\$\{(\w+)\}", body))
  assert names and all(re.search(rf"#\s+{n}\s", header) for n in names), names
  with open(SCRIPT) as f:
    script = f.read()
  assert all(n in script for n in names)


def test_bad_slice_and_missing_image_are_one_line_errors():
  p = _script("jobset", "v5p-8", "experiments/fusion_3b.py:stage1", "gs://b/r", IMAGE="x")
  assert p.returncode == 2 and "not a multi-host slice" in p.stderr
  p = _script("topology", "v9-64")
  assert p.returncode == 2 and "unknown TPU type 'v9-64'" in p.stderr
  env = {k: v for k, v in os.environ.items() if k != "IMAGE"}
  p = subprocess.run(["bash", SCRIPT, "jobset", "v5p-128", "c.py", "gs://b/r"], env=env,
                     capture_output=True, text=True, timeout=30)
  assert p.returncode != 0 and "set IMAGE" in p.stderr


def test_distributed_env_args():
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.initialize_args(env) == dict(
      coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)
  # Nothing set: jax's own cluster detection (Cloud TPU, SLURM, Open MPI) fills everything.
  assert distributed.initialize_args({}) == {}
  assert distributed.initialize_args({"JAX_COORDINATOR_ADDRESS": "h:1"}) == dict(
      coordinator_address="h:1")
  bad = [({**env, "JAX_PROCESS_ID": "2"}, "must be in [0, JAX_NUM_PROCESSES=2)"),
         ({**env, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
         ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "need JAX_COORDINATOR_ADDRESS"),
         ({**env, "JAX_COORDINATOR_ADDRESS": "host"}, "needs a port"),
         ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "set both")]
  for e, msg in bad:
    with pytest.raises(ValueError, match=re.escape(msg)):
      distributed.initialize_args(e)
