"""VLMEvalKit's multiple-choice judge step for eval.bench: the answers the rules cannot read go
to the judge (bench_judge.Judge) with VLMEvalKit's option-matching prompt.

Benchmarks: MMBench, ScienceQA_IMG, MMVP, CV-Bench (bench_metrics.score_multiple_choice), the
ones VLMEvalKit evaluates with ImageMCQDataset.evaluate_heuristic / CVBench.evaluate and scored
here with its `can_infer`. VLMEvalKit (commit e8e78f0), vlmeval/dataset/utils/multiple_choice.py:

  extract_answer_from_item  `can_infer` on the answer; else `build_prompt` (`build_prompt_cn`
                            for a question with CJK characters, `cn_string`) with the options by
                            `build_option_str`, and `retry = 3` tries of `model.generate(prompt)`;
                            the judge is `build_judge`'s OpenAIWrapper with its defaults
                            (temperature 0 on every try, max_tokens 2048); a reply is usable when
                            `can_infer` reads it (an option letter, or 'Z': none); when all tries
                            fail, `rd.choice(list(choices) + ['Z'])`, Python's unseeded global
                            `random` (here seeded by the row's index and flagged `random_pick`).
  mcq_vanilla_eval          every row on its own (ScienceQA, MMVP, CV-Bench).
  mcq_circular_eval         a question's rotations as one group (MMBench): prefetch_circular_group
                            reads every rotation by rules; one read and wrong fails the group
                            with no judge call, all read and right passes it; else
                            eval_circular_group judges the unread rotations in index order and
                            stops at the first that comes out wrong.

The rules are ours (bench_metrics.extract_choice: a leading letter first, then `can_infer`); a
row is unread when they give no letter and `can_infer` gives no 'Z' (VLMEvalKit's prefetch takes
a 'Z', a refusal, as read: wrong, never judged).
"""
from __future__ import annotations

import collections
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fusion_jax.eval import bench_judge, bench_metrics
from fusion_jax.eval.bench_formats import Row, group_index
from fusion_jax.eval.bench_prompts import options_of

TRIES = 3  # extract_answer_from_item's retry
_CJK = re.compile("[\u4e00-\u9fff]")  # vlmeval/smp/misc.py cn_string


def option_str(choices: Mapping[str, str]) -> str:
  """VLMEvalKit's build_option_str (vlmeval/smp/vlm.py)."""
  return "There are several options: \n" + "".join(f"{c}. {v}\n" for c, v in choices.items())


def prompt(question: str, choices: Mapping[str, str], prediction: str) -> str:
  """VLMEvalKit's build_prompt, or build_prompt_cn for a question with CJK characters."""
  if _CJK.search(question):
    tmpl = (
        '你是一个帮助我匹配答案与单选题中多个选项的 AI 助手。'
        '你会被提供：一个问题，多个选项，一个答案。你的任务是找到与答案意义最相近的选项。'
        '如果所有选项的意义都与答案显著不同，则输出 Z。'
        '你应该输出一个单个的大写字母，例如 A, B, C, D（如果它们是有效选项），或 Z。'
        '例 1:'
        '问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 一只可爱的泰迪熊\n输出: A\n'  # noqa: E501
        '例 2: \n'
        '问题: 图中最主要的物体是什么?\n选项: A. 泰迪熊 B. 兔子 C. 猫 D. 狗\n答案: 蜘蛛\n输出: Z\n'
        '例 3: \n'
        '问题: {}?\n选项: {}\n答案: {}\n输出: '
    )
  else:
    tmpl = (
        'You are an AI assistant who will help me to match '
        'an answer with several options of a single-choice question. '
        'You are provided with a question, several options, and an answer, '
        'and you need to find which option is most similar to the answer. '
        'If the meaning of all options are significantly different from the answer, output Z. '
        'Your should output a single uppercase character in A, B, C, D (if they are valid options), and Z. \n'  # noqa: E501
        'Example 1: \n'
        'Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n'  # noqa: E501
        'Answer: a cute teddy bear\nYour output: A\n'
        'Example 2: \n'
        'Question: What is the main object in image?\nOptions: A. teddy bear B. rabbit C. cat D. dog\n'  # noqa: E501
        'Answer: Spider\nYour output: Z\n'
        'Example 3: \n'
        'Question: {}?\nOptions: {}\nAnswer: {}\nYour output: '
    )
  return tmpl.format(question, option_str(choices), prediction)


def random_pick(row: Row, choices: Mapping[str, str]) -> str:
  """VLMEvalKit's fallback when every try fails: one of the option letters and 'Z' at random,
  here from a generator seeded by the row's index (VLMEvalKit's is unseeded)."""
  options = list(choices) + (["Z"] if "Z" not in choices else [])
  return random.Random(f"mcq_judge {row.index}").choice(options)


def unread(prediction: str, extracted: str, choices: Mapping[str, str]) -> bool:
  """Whether the rules left an answer to the judge: no letter, and not a refusal ('Z')."""
  return not extracted and bench_metrics.can_infer(prediction, choices) != "Z"


def judge_row(judge: bench_judge.Judge, row: Row, prediction: str) -> dict[str, Any]:
  """extract_answer_from_item's judge step for one row: {extracted, judge (the usable reply or
  None), judge_tries, random_pick}."""
  choices = options_of(row)
  reply, tries = judge.first_usable(
      prompt(row.question, choices, prediction),
      lambda text: bool(bench_metrics.can_infer(text, choices)),
      tries=TRIES, step=0.0)
  if reply is None:
    judge.count_random_pick()
    letter = random_pick(row, choices)
  else:
    letter = str(bench_metrics.can_infer(reply, choices))
  return {"extracted": letter, "judge": reply, "judge_tries": tries, "random_pick": reply is None}


def read_choices(rows: Sequence[Row], preds: Sequence[str], judge: bench_judge.Judge | None,
                 *, circular: bool = False) -> list[dict[str, Any]]:
  """Each answer's reading, {"extracted": letter or ''} by the rules (bench_metrics.
  extract_choice), plus `judge_row`'s fields where the judge read it: every unread row, or,
  circular, the unread rotations of each question as mcq_circular_eval judges them."""
  reads = [{"extracted": bench_metrics.extract_choice(p, options_of(r))}
           for r, p in zip(rows, preds)]
  if judge is None:
    return reads
  todo = [i for i, (r, p) in enumerate(zip(rows, preds))
          if unread(p, reads[i]["extracted"], options_of(r))]
  if circular:
    judged = _judge_circular(rows, preds, reads, set(todo), judge)
  else:
    judged = dict(zip(todo, judge.map(lambda i: judge_row(judge, rows[i], preds[i]), todo)))
  for i, res in judged.items():
    reads[i] = res
  return reads


def _judge_circular(rows: Sequence[Row], preds: Sequence[str], reads: Sequence[dict[str, Any]],
                    unread_rows: set[int], judge: bench_judge.Judge
                    ) -> dict[int, dict[str, Any]]:
  """mcq_circular_eval's judge calls, {row: `judge_row`'s reading}: a question whose rotations
  the rules read are all right but not all read has its unread ones judged in index order
  (VLMEvalKit sorts by index; a non-numeric index keeps the file's order) until one is wrong."""
  letters = [bench_metrics.answer_letter(r) for r in rows]
  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i, r in enumerate(rows):
    groups[group_index(r)].append(i)
  todo = [sorted(members, key=lambda i: _as_int(rows[i].index)) for members in groups.values()
          if unread_rows.intersection(members) and all(
              i in unread_rows or reads[i]["extracted"] == letters[i] for i in members)]

  def judge_group(members: list[int]) -> dict[int, dict[str, Any]]:
    out = {}
    for i in (i for i in members if i in unread_rows):
      out[i] = judge_row(judge, rows[i], preds[i])
      if out[i]["extracted"] != letters[i]:
        break
    return out

  return {i: res for out in judge.map(judge_group, todo) for i, res in out.items()}


def _as_int(index: str) -> int:
  try:
    return int(index)
  except ValueError:
    return 0
