"""Benchmark prompts, as the lmms-eval tasks FUSION is evaluated with build them.

Strings copied from lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval, lmms_eval/tasks/, commit
75571cf), `default` lmms_eval_specific_kwargs:
  * MMBench  (mmbench/_default_template_mmbench_en_yaml, en_utils.mmbench_doc_to_text,
    mmbench_evals.create_options_prompt, mmbench.yaml sys_prompt):
    "{hint} {question} There are several options:\nA. ..\nB. .." + MC_POST
  * ScienceQA_IMG (scienceqa/scienceqa_img.yaml, utils.sqa_doc_to_text):
    "Context: {hint}\n{question}\nA. ..\nB. .." + MC_POST  (no Context line without a hint)
  * MMVP (mmvp/_default_template_yaml, utils.mmvp_doc_to_text): "{question}\nA. ..\nB. .." + MC_POST
  * AI2D (ai2d/ai2d.yaml, utils.ai2d_doc_to_text, prompt_format mcq): the same layout as MMVP
  * CV-Bench (cv_bench/_default_template_yaml, utils.cv_bench_doc_to_text): CV_BENCH_PRE with the
    letters, "\n", then the dataset's `prompt` ("{question} Select from the following
    choices.\n(A) ..\n(B) ..", rebuilt from the option columns when the file has no prompt)
  * POPE, GQA (pope/pope.yaml, gqa/gqa.yaml): "{question}" + SHORT_POST
  * TextVQA (textvqa/_default_template_textvqa_yaml, utils.textvqa_doc_to_text):
    "{question.capitalize()}" + SHORT_POST
  * MME (mme/mme.yaml, utils.mme_doc_to_text): the question with MME_REPLACED removed, + SHORT_POST
  * MMStar (mmstar/_default_template_yaml, utils.mmstar_doc_to_text): the stripped question,
    which carries its options ("Options: A: .., B: .."), with MME_REPLACED removed, + MMSTAR_POST
    (MC_POST without its full stop); a file whose question lacks the options gets them appended
    in that style from its option columns
  * SEED-Bench (seedbench/utils.seed_doc_to_text): the MMVP layout over choices A-D (the
    dataset's choice_a .. choice_d columns, or option columns)
  * OCRBench (ocrbench/ocrbench.yaml, utils.ocrbench_doc_to_text): the stripped question alone
  * ChartQA (chartqa/chartqa.yaml, utils.chartqa_doc_to_text): "{question}" + CHARTQA_POST
  * DocVQA_VAL, InfoVQA_VAL (docvqa/_default_template_docvqa_yaml, infovqa/
    _default_template_infovqa_yaml, utils.*_doc_to_text): "{question}" + SHORT_POST
  * VizWiz_VQA_VAL (vizwiz_vqa/_default_template_vqa_yaml, utils.vizwiz_vqa_doc_to_text):
    "{question.capitalize()}" + VIZWIZ_UNANSWERABLE + SHORT_POST
  * RealWorldQA (realworldqa/realworldqa.yaml, utils.realworldqa_doc_to_text, empty
    post_prompt): the stripped question, which carries its options and instruction; a file whose
    question lacks the options gets them appended as "\n\nA. ..\nB. ..\n\n" + REALWORLDQA_MC
    (our reconstruction of the xai-org/RealworldQA layout)
  * HallusionBench (hallusion_bench/evaluate_hb.hb_doc_to_text; VLMEvalKit commit e8e78f0,
    vlmeval/dataset/image_yorn.py, adds nothing either): the question alone
  * MME-RealWorld (mme_realworld/utils.mme_realworld_doc_to_text): "{question} " +
    MME_RW_OPTIONS_HEADER + "\n(A) ..\n(E) ..\n" + MME_RW_POST
  * MMMU (mmmu/mmmu_val.yaml default kwargs, utils.construct_prompt, interleaved_format false):
    multiple choice "{question}\nA. ..\nB. ..\n\n" + MC_POST without its newline, open
    "{question}\n\n" + SHORT_POST without its newline; "<image k>" placeholders stay in the text
    (lmms-eval's doc_to_text path; doc_to_messages, for chat models, interleaves the images)
  * MathVista (VLMEvalKit e8e78f0, vlmeval/dataset/image_vqa.py MathVista, which keeps
    ImageBaseDataset.build_prompt of vlmeval/dataset/image_base.py): the `question` cell as it
    is; VLMEvalKit's MathVista_MINI.tsv holds there the dataset's `query` ("Hint: Please answer
    the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the
    end.\nQuestion: ..\nChoices:\n(A) ..\n(B) ..", as the model wrappers that re-parse it
    read it, e.g. vlmeval/vlm/bunnyllama3.py). A row in the Hugging Face layout (AI4Math/
    MathVista: a bare `question` and a `query`) is asked its `query`. (lmms-eval 75571cf has no
    single default: its mathvista_testmini group runs three prompt styles, each with a GPT judge.)
LLaVA question jsonl `text` often already ends in the instruction; it is then not added twice.
"""
from __future__ import annotations

import ast
import re
import string

from fusion_jax.eval.bench_formats import Row

MC_POST = "\nAnswer with the option's letter from the given choices directly."
SHORT_POST = "\nAnswer the question using a single word or phrase."
MMBENCH_OPTIONS_HEADER = "There are several options:"
MME_REPLACED = " Please answer yes or no."
MMSTAR_POST = "\nAnswer with the option's letter from the given choices directly"
MMSTAR_OPTIONS_HEADER = "Options:"
CV_BENCH_PRE = ("Note: You only need to respond with {} without providing any additional "
                "information.\n")
CHARTQA_POST = "\nAnswer the question with a single word."
VIZWIZ_UNANSWERABLE = ("\nWhen the provided information is insufficient, respond with "
                       "'Unanswerable'.")
# lmms-eval realworldqa/utils.py REPLACE_PROMPT (the dataset's own instruction)
REALWORLDQA_MC = ("Please answer directly with only the letter of the correct option and "
                  "nothing else.")
MME_RW_OPTIONS_HEADER = "The choices are listed below:"
MME_RW_POST = ("Select the best answer to the above multiple-choice question based on the image. "
               "Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
               "The best answer is: ")


def _with_post(text: str, post: str) -> str:
  return text if post.strip() in text else text + post


def options_of(row: Row) -> dict[str, str]:
  """letter -> option text: the option columns, else an `options` / `choices` cell
  ("(a) x (b) y" as MMVP's, or a list as CV-Bench's)."""
  if row.options:
    return dict(row.options)
  named = {c.upper(): row.extra[f"choice_{c}"] for c in "abcdefgh" if f"choice_{c}" in row.extra}
  if named:  # SEED-Bench's choice_a .. choice_d
    return named
  raw = row.extra.get("options") or row.extra.get("choices") or ""
  if raw.startswith("["):
    try:
      items = [str(x) for x in ast.literal_eval(raw)]
    except (ValueError, SyntaxError):
      items = []
  else:  # lmms-eval mmvp utils._parse_options
    items = [m.strip() for m in re.findall(r"\([a-z]\)\s*([^(]+?)(?=\s*\([a-z]\)|$)", raw, re.I)]
  return {string.ascii_uppercase[i]: t for i, t in enumerate(items)}


def _lettered(options: dict[str, str], fmt: str = "{}. {}") -> str:
  return "\n".join(fmt.format(k, v) for k, v in options.items())


def mmbench(row: Row) -> str:
  opts = options_of(row)
  body = f"{row.question} {MMBENCH_OPTIONS_HEADER}\n{_lettered(opts)}" if opts else row.question
  if row.hint:
    body = f"{row.hint} {body}"
  return _with_post(body, MC_POST)


def scienceqa(row: Row) -> str:
  opts = options_of(row)
  context = f"Context: {row.hint}\n" if row.hint else ""
  body = f"{context}{row.question}" + (f"\n{_lettered(opts)}" if opts else "")
  return _with_post(body, MC_POST)


def mmvp(row: Row) -> str:
  opts = options_of(row)
  return _with_post(row.question + (f"\n{_lettered(opts)}" if opts else ""), MC_POST)


ai2d = mmvp  # lmms-eval builds both as "{question}\nA. ..\nB. .." + MC_POST
seedbench = mmvp  # and SEED-Bench too (its choices are A-D)


def mmstar(row: Row) -> str:
  q = row.question.strip().replace(MME_REPLACED, "")
  opts = options_of(row)
  if opts and MMSTAR_OPTIONS_HEADER not in q:
    q += f"\n{MMSTAR_OPTIONS_HEADER} " + ", ".join(f"{k}: {v}" for k, v in opts.items())
  return _with_post(q, MMSTAR_POST)


def cv_bench(row: Row) -> str:
  opts = options_of(row)
  prompt = row.extra.get("prompt")
  if not prompt:
    prompt = row.question
    if opts:
      prompt += " Select from the following choices.\n" + _lettered(opts, "({}) {}")
  letters = ", ".join(opts) if opts else "A, B"
  if CV_BENCH_PRE.split("{}")[0] in prompt:
    return prompt
  return CV_BENCH_PRE.format(letters) + "\n" + prompt


def short_answer(row: Row) -> str:
  return _with_post(row.question.strip(), SHORT_POST)


def textvqa(row: Row) -> str:
  q = row.question.strip()
  return q if SHORT_POST.strip() in q else q.capitalize() + SHORT_POST


def mme(row: Row) -> str:
  return _with_post(row.question.strip().replace(MME_REPLACED, ""), SHORT_POST)


def ocrbench(row: Row) -> str:
  return row.question.strip()


def chartqa(row: Row) -> str:
  return _with_post(row.question, CHARTQA_POST)


def docvqa(row: Row) -> str:  # InfoVQA too
  return _with_post(row.question, SHORT_POST)


def vizwiz(row: Row) -> str:
  q = row.question.strip()
  post = VIZWIZ_UNANSWERABLE + SHORT_POST
  return q if VIZWIZ_UNANSWERABLE.strip() in q else q.capitalize() + post


def realworldqa(row: Row) -> str:
  q = row.question.strip()
  opts = options_of(row)
  if opts and not re.search(r"(?m)^A\.\s", q):
    q += f"\n\n{_lettered(opts)}\n\n{REALWORLDQA_MC}"
  return q


def hallusionbench(row: Row) -> str:
  return row.question


def mme_realworld_options(row: Row) -> str:
  """The "(A) .." lines: the file's `multi-choice options` (VLMEvalKit: the header and the lines
  as one cell; its Lite TSV and lmms-eval: a list of "(A) .." strings), else the option columns."""
  raw = (row.extra.get("multi-choice options") or "").strip()
  if raw.startswith("["):
    try:
      return "\n".join(str(o) for o in ast.literal_eval(raw))
    except (ValueError, SyntaxError):
      pass
  elif raw:
    return raw.removeprefix(MME_RW_OPTIONS_HEADER).strip("\n")
  return _lettered(options_of(row), "({}) {}")


def mme_realworld(row: Row) -> str:
  return (f"{row.question} {MME_RW_OPTIONS_HEADER}\n{mme_realworld_options(row)}\n"
          f"{MME_RW_POST}")


def mmmu_is_open(row: Row) -> bool:
  """lmms-eval: question_type 'open'; VLMEvalKit's TSV: no option columns."""
  kind = row.extra.get("question_type", "")
  return kind == "open" if kind else not options_of(row)


def mmmu(row: Row) -> str:
  if mmmu_is_open(row):
    return f"{row.question}\n\n{SHORT_POST.strip()}"
  return f"{row.question}\n{_lettered(options_of(row))}\n\n{MC_POST.strip()}"


def mathvista(row: Row) -> str:
  q = row.question
  query = row.extra.get("query", "")
  return query if query and not q.lstrip().startswith("Hint:") else q
