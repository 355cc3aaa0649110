"""`ItemRejected`: how a describe or ask backend drops an item with a counted reason.

The procedural stages never raise it (their filter returns reasons instead); model backends do
when a reply stays malformed after its retries. The resumable engine (sharded.py) records the
item as rejected with `reason`, counts it in stats.json and never writes a record for it.
"""
from __future__ import annotations

# Reasons the model backends add to filter.REASONS (counted in stats.json "rejected").
MODEL_REASONS: tuple[str, ...] = ("malformed_description", "malformed_qa", "request_rejected",
                                  "vlm_disagree", "vlm_malformed")


class ItemRejected(Exception):
  """Drop this item; `reason` is one of MODEL_REASONS (or a backend's own short word)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail
