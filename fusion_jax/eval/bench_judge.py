"""An optional answer judge for eval.bench: a chat model behind an OpenAI-compatible endpoint
(vLLM, SGLang, TGI, fusion_jax.serve, or OpenAI itself), asked what VLMEvalKit asks its GPT
judge where the rules cannot read an answer.

  python -m fusion_jax.eval.bench ... --judge_url http://localhost:8000/v1 --judge_model NAME

VLMEvalKit (github.com/open-compass/VLMEvalKit, commit e8e78f0) scores some benchmarks in two
steps: rules first, then, for the answers the rules cannot read, a judge model (`build_judge`:
gpt-4o-mini as run.py picks it, any OpenAI-compatible model with LOCAL_LLM). Each judged answer
gets up to 5 tries at temperature 0.5 * i (multiple choice: 3 at temperature 0), the first
usable reply wins, and an answer whose tries all fail counts as wrong (multiple choice: a random
option or 'Z'). The prompts are VLMEvalKit's, verbatim:

  MathVista       `build_mathvista_gpt4_prompt` (5 in-context extractions; max_tokens 128, as
                  MathVista.evaluate builds its judge); any reply is usable (MathVista_auxeval)
  MME, POPE,      `YOrN_match_prompt` for answers YOrN_Extraction reads as neither yes nor no
  HallusionBench  (ImageYORNDataset.evaluate; max_tokens 2048, OpenAIWrapper's default); a
                  reply is usable when it reads as yes or no (YOrN_auxeval;
                  bench_metrics.read_yes_no)
  MMBench,        `build_prompt` (`build_prompt_cn` for a Chinese question; max_tokens 2048)
  ScienceQA_IMG,  for answers the rules (bench_metrics.extract_choice) cannot read
  MMVP, CV-Bench  (extract_answer_from_item, mcq_circular_eval; bench_mcq_judge.py); a reply
                  is usable when `can_infer` reads it

Without --judge_url nothing is sent anywhere: the rules alone score (MathVista's accuracy is
then a lower bound). The judge is only as good as its model: a report names it, and the
published numbers used OpenAI's GPT-4 models.
"""
from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any

from fusion_jax.synth.openai_client import ChatClient, RequestFailed, RequestRejected

TRIES = 5  # VLMEvalKit's retry in MathVista_auxeval and YOrN_auxeval
MAX_TOKENS = 2048  # OpenAIWrapper's default: the judges built without max_tokens (yes/no, MCQ)
MATHVISTA_MAX_TOKENS = 128  # MathVista.evaluate's build_judge(max_tokens=128)


class Judge:
  """One endpoint and model; `ask` returns the reply text or None (the request failed for good,
  after the client's own retries of transient errors). Thread-safe; counts calls, failures and
  answers picked at random (VLMEvalKit's multiple-choice fallback, bench_mcq_judge.py)."""

  def __init__(self, client: ChatClient, max_tokens: int = MAX_TOKENS, workers: int = 4):
    self.client, self.max_tokens, self.workers = client, max_tokens, workers
    self.calls = self.failed = self.random_picks = 0
    self.last_error = ""
    self._lock = threading.Lock()

  def ask(self, prompt: str, temperature: float, max_tokens: int | None = None) -> str | None:
    with self._lock:
      self.calls += 1
    try:
      return self.client.chat([{"role": "user", "content": prompt}], temperature=temperature,
                              max_tokens=max_tokens or self.max_tokens)
    except (RequestFailed, RequestRejected) as e:
      with self._lock:
        self.failed += 1
        self.last_error = str(e)
      return None

  def first_usable(self, prompt: str, usable: Callable[[str], bool], *, tries: int = TRIES,
                   step: float = 0.5, max_tokens: int | None = None) -> tuple[str | None, int]:
    """(the first reply that `usable` accepts, or None; tries used): try i at temperature
    step * i, as VLMEvalKit's auxeval loops (0.5 * i; its multiple-choice judge: 0)."""
    for i in range(tries):
      reply = self.ask(prompt, temperature=step * i, max_tokens=max_tokens)
      if reply is not None and usable(reply):
        return reply, i + 1
    return None, tries

  def count_random_pick(self) -> None:
    with self._lock:
      self.random_picks += 1

  def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """fn over items, `workers` at once (VLMEvalKit's nproc), results in order."""
    if not items:
      return []
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      return list(pool.map(fn, items))

  def summary(self) -> dict[str, Any]:
    out = {"url": self.client.url, "model": self.client.model, "calls": self.calls,
           "failed_calls": self.failed, "random_picks": self.random_picks}
    if self.last_error:
      out["last_error"] = self.last_error
    return out


def build(url: str, model: str, api_key_env: str = "OPENAI_API_KEY", workers: int = 4
          ) -> Judge | None:
  """The judge of --judge_url / --judge_model, or None without a url."""
  if not url:
    return None
  if not model:
    raise ValueError("--judge_url needs --judge_model (the served model's name, e.g. "
                     "Qwen/Qwen2.5-72B-Instruct)")
  if workers < 1:
    raise ValueError(f"--judge_workers {workers}: must be >= 1")
  return Judge(ChatClient(url, model, api_key_env=api_key_env, max_retries=3), workers=workers)


# VLMEvalKit vlmeval/dataset/utils/mathvista.py get_gpt4_ICE / build_mathvista_gpt4_prompt,
# verbatim (its "respone" included).
_MATHVISTA_ICE = [
    """
Hint: Please answer the question requiring an integer answer and provide the final value,
e.g., 1, 2, 3, at the end.\n
Question: Which number is missing?\n
Model response: The number missing in the sequence is 14.\n
Extracted answer: 14
""",
    """
Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value,
e.g., 1.2, 1.3, 1.4, at the end.\n
Question: What is the fraction of females facing the camera?\n
Model response: The fraction of females facing the camera is 0.6,
which means that six out of ten females in the group are facing the camera.\n
Extracted answer: 0.6
""",  # noqa: E501
    """
Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value,
e.g., 1.23, 1.34, 1.45, at the end.\n
Question: How much money does Luca need to buy a sour apple candy and a butter-scotch candy? (Unit: $)\n
Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.\n
Extracted answer: 1.45
""",  # noqa: E501
    """
Hint: Please answer the question requiring a Python list as an answer and provide the final list,
e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.\n
Question: Between which two years does the line graph saw its maximum peak?\n
Model response: The line graph saw its maximum peak between 2007 and 2008.\n
Extracted answer: [2007, 2008]
""",
    """
Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n
Question: What fraction of the shape is blue?\n
Choices: (A) 3/11 (B) 8/11 (C) 6/11 (D) 3/5\n
Model response: The correct answer is (B) 8/11.\n
Extracted answer: B
""",  # noqa: E501
]


def mathvista_prompt(question: str, prediction: str) -> str:
  """VLMEvalKit's build_mathvista_gpt4_prompt for a row's `question` and the model's answer."""
  prompt = """
Please read the following example.
Then extract the answer from the model response and type it at the end of the prompt.\n
"""
  for example in _MATHVISTA_ICE:
    prompt += example + "\n"
  return prompt + question + "\n" + "Model respone: " + str(prediction) + "Extracted answer:"


def yes_no_prompt(question: str, prediction: str) -> str:
  """VLMEvalKit's YOrN_match_prompt (vlmeval/dataset/utils/yorn.py)."""
  return (
      "You are an AI assistant who will help me to match an answer with two options of a "
      "question. The options are only Yes / No. You are provided with a question and an answer, "
      "and you need to find which option (Yes / No) is most similar to the answer. If the "
      "meaning of all options are significantly different from the answer, output Unknown. "
      "Your should output a single word among the following 3 choices: Yes, No, Unknown.\n"
      "Example 1: \n"
      "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is "
      "'Hello'.\nYour output: Yes\n"
      "Example 2: \n"
      "Question: Is the word in this image 'Hello'?\n"
      "Answer: The word in this image is not 'Hello'.\nYour output: No\n"
      "Example 3: \n"
      f"Question: {question}?\nAnswer: {prediction}\nYour output: ")
