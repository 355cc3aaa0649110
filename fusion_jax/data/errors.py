"""The one exception a bad training sample raises, with a machine-readable reason.

The pipeline catches `BadSample` (and only it: no bare excepts, docs/model.md §12), counts it per
`reason`, logs `source`, and moves on to the next record. Anything else is a bug and propagates.
"""
from __future__ import annotations

# Every reason a sample can be skipped for. Keys are short snake_case so counters stay readable.
REASONS: tuple[tuple[str, str], ...] = (
    ("bad_json", "the record line is not valid JSON / not a JSON object"),
    ("bad_record", "the record lacks 'conversations' or it is not a list of {from, value} dicts"),
    ("missing_image", "the record names an image file that does not exist / cannot be opened"),
    ("corrupt_image", "the image bytes cannot be decoded by PIL (truncated, wrong format, ...)"),
    ("image_too_large", "the image exceeds PIL's decompression-bomb limit (MAX_IMAGE_PIXELS)"),
    ("image_outside_root", "the image path is absolute or leaves the image root (.., symlinks)"),
    ("no_answer_turn", "no gpt turn after the (fixed-up) conversation, nothing to supervise"),
    ("empty_text", "a turn's value is empty or whitespace only"),
    ("non_alternating_roles", "turns do not alternate human, gpt, human, gpt, ..."),
    ("unknown_role", "a turn's 'from' is neither human/user nor gpt/assistant"),
    ("too_many_image_markers", "more than one <image> marker (multi-image is unsupported)"),
    ("image_marker_without_image", "an <image> marker in a record that names no image"),
    ("reserved_marker_in_text", "the text contains a placeholder string such as <latent_image>"),
    ("no_supervised_tokens", "after truncation to seq_len no supervised label is left"),
    ("unknown_template", "the conversation template name is not known"),
)

# Not skips: normalisations applied silently to a sample, counted by the pipeline as fix-ups.
FIXUPS: tuple[tuple[str, str], ...] = (
    ("starts_with_gpt", "a leading gpt turn is dropped (the authors' preprocess does the same)"),
    ("trailing_human", "a trailing human turn without an answer is dropped"),
    ("image_without_marker", "an image record without <image> marker: the marker is implied"),
    ("image_marker_moved", "the <image> marker sat in a later user turn: moved to the first one"),
)

REASON_KEYS: frozenset[str] = frozenset(k for k, _ in REASONS)
FIXUP_KEYS: frozenset[str] = frozenset(k for k, _ in FIXUPS)


class BadSample(ValueError):
  """A sample that cannot be used for training; skip it and count `reason`.

  Attributes:
    reason: a key of `REASONS` (snake_case), used for counters.
    source: where the sample came from (``file:line`` or a record id), for the log line.
  """

  def __init__(self, reason: str, message: str = "", source: str = ""):
    self.reason = reason
    self.source = source
    self.message = message
    text = reason if not message else f"{reason}: {message}"
    if source:
      text = f"{text} [{source}]"
    super().__init__(text)

  def __reduce__(self):
    # Pickle-able across grain worker processes (ValueError's default reduce loses kwargs).
    return (BadSample, (self.reason, self.message, self.source))
