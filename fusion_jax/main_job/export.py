"""The main job's export: the final weights in the authors' PyTorch layout."""
from __future__ import annotations

import os
import shutil

import ml_collections

from fusion_jax.main_job import say


def export_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """<workdir>/<a folder name the authors' loader routes to the right class> (torch_fusion_phi
  for the smoke model)."""
  from fusion_jax.convert import export_torch as export_lib
  from fusion_jax.task.fusion import fusion_config_from
  return os.path.join(workdir, export_lib.torch_dir_name(fusion_config_from(config.model)))


def export(workdir: str, out: str) -> str | None:
  """Exports the run's final weights into `out` (replaced); returns the summary's note when the
  authors' code cannot run the export, else None.

  The smoke model (32 px tower, 4 tower layers, 4 interaction heads) is too small for the
  authors' hard-coded shapes: it is exported anyway (exact weights that import_torch reads back)
  and the summary and the export's README.md say so.
  """
  from fusion_jax.convert import export_torch as export_lib
  if os.path.isdir(out):
    shutil.rmtree(out)
  problems = export_lib.export_torch(workdir, out, allow_incompatible=True, log=say)
  if problems:
    return ("exported with --allow_incompatible; the authors' code cannot run it: "
            + "; ".join(problems))
  return None
