"""Batched greedy answers to SQuAD questions, the model's probability of abstaining, and the seed's rules for
reading an answer.

A generative model has no "null score" as an extractive one has, so SQuAD 2.0's no-answer probability is computed
as what it literally is: the probability that the model writes the abstention it was trained to write. With it, a
threshold decides instead of greedy decoding: abstain when na_prob > threshold, else give the best answer that is
not an abstention (greedy decoding with the abstention's first token, and EOS, forbidden at the first step).
"""
import math
import sys
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from data.prompts import ANSWER_MARKER, NO_ANSWER, answer_tokens, prompt_tokens
from data.squad import SquadExample
from gpt2 import EOS_ID, GPT, continuation_log_prob, generate, get_tokenizer


def clean_answer(generated: str) -> str:
    """The seed's rule: the answer is the generated text up to a repeated "ANSWER:" marker."""
    return generated.split(ANSWER_MARKER)[0].strip()


def official_answer(text: str) -> str:
    """SQuAD's predictions format: "" means no answer (the model says "Cannot Find Answer")."""
    return "" if text.strip() == NO_ANSWER else text


@torch.no_grad()
def answer(model: GPT, examples: list[SquadExample], batch_size: int, max_new_tokens: int,
           progress: bool = True, forbid_abstention: bool = False) -> list[str]:
    """Greedy answers to every question, in order.

    forbid_abstention: the best answer that is not an abstention. "Cannot Find Answer" is the tokens
    C|annot| Find| Answer, so "C" may not be the first token, nor EOS (an empty answer abstains too). That also rules
    out the few answers that start with the bare token "C" ("Cape Town" is C|ape| Town): 29 of the dev set's 5,928
    first gold answers (0.5%).

    Says on stderr how many contexts were cut to fit.
    """
    prompts, cut = prompt_tokens(examples, model.config.block_size, max_new_tokens)
    if cut:
        print(f"note: {cut} of {len(prompts)} context(s) cut at the end to fit {model.config.block_size - max_new_tokens} "
              f"prompt tokens ({model.config.block_size} minus {max_new_tokens} for the answer): their answers come "
              f"from the part that fits", file=sys.stderr)

    def answer_batch(batch: list[list[int]]) -> list[str]:
        return answer_prompts(model, batch, max_new_tokens, forbid_abstention)
    return _longest_first(prompts, batch_size, answer_batch, "answering", progress)


@torch.no_grad()
def answer_prompts(model: GPT, prompts: list[list[int]], max_new_tokens: int,
                   forbid_abstention: bool = False) -> list[str]:
    """answer()'s work on one batch of prompt tokens: greedy decoding up to a repeated "ANSWER:" marker."""
    enc = get_tokenizer()
    stop = [enc.encode_ordinary(ANSWER_MARKER)]
    forbid = [answer_tokens(NO_ANSWER, add_eos=False)[0], EOS_ID] if forbid_abstention else ()
    outputs = generate(model, prompts, max_new_tokens, stop_sequences=stop, forbid_first=forbid)
    return [clean_answer(enc.decode(tokens)) for tokens in outputs]


@torch.no_grad()
def no_answer_probability(model: GPT, examples: list[SquadExample], batch_size: int, max_new_tokens: int,
                          add_eos: bool, progress: bool = True) -> list[float]:
    """SQuAD 2.0's na_prob for every question, in order: the model's probability of writing exactly the tokens it
    was trained to abstain with, "Cannot Find Answer" and then EOS (without EOS for a --no-eos run, whose model
    never learned to stop: `add_eos`). That is the product of each token's probability, teacher-forced after the
    prompt, in one batched pass (gpt2.continuation_log_prob).

    The prompts are answer()'s for the same `max_new_tokens` (contexts shortened alike), so na_prob speaks of the
    very prompts that are answered."""
    prompts = no_answer_prompts(examples, model.config.block_size, max_new_tokens, add_eos)

    def probabilities(batch: list[list[int]]) -> list[float]:
        return abstention_probabilities(model, batch, add_eos)
    return _longest_first(prompts, batch_size, probabilities, "no-answer probabilities", progress)


def no_answer_prompts(examples: Sequence[SquadExample], block_size: int, max_new_tokens: int,
                      add_eos: bool) -> list[list[int]]:
    """The prompts na_prob scores: answer()'s, with room for the abstention if it is longer than max_new_tokens."""
    abstention = answer_tokens(NO_ANSWER, add_eos)
    return prompt_tokens(examples, block_size, max(max_new_tokens, len(abstention)))[0]


@torch.no_grad()
def abstention_probabilities(model: GPT, prompts: list[list[int]], add_eos: bool) -> list[float]:
    """no_answer_probability()'s work on one batch of prompt tokens."""
    abstention = answer_tokens(NO_ANSWER, add_eos)
    # exp in float64: a confident model's na_prob can be far below fp32's smallest number.
    return [math.exp(lp) for lp in continuation_log_prob(model, prompts, abstention).tolist()]


def answer_with_threshold(model: GPT, examples: list[SquadExample], na_probs: Sequence[float], threshold: float,
                          batch_size: int, max_new_tokens: int, progress: bool = True) -> list[str]:
    """Answers decided by a no-answer threshold, as SQuAD 2.0's official script applies it: "Cannot Find Answer"
    where na_prob > threshold, else the best answer that is not an abstention. Only the answered ones are decoded."""
    answered = [i for i, p in enumerate(na_probs) if p <= threshold]
    texts = answer(model, [examples[i] for i in answered], batch_size, max_new_tokens, progress,
                   forbid_abstention=True)
    answers = [NO_ANSWER] * len(examples)
    for i, text in zip(answered, texts):
        answers[i] = text
    return answers


def _longest_first(prompts: list[list[int]], batch_size: int, run: Callable[[list[list[int]]], list], desc: str,
                   progress: bool) -> list:
    """run(batch of prompts) -> one result per prompt, applied to batches of similar length, longest first (little
    padding, and the largest batch comes first, so memory runs out at once if it must); results in prompt order."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, result in zip(chunk, run([prompts[i] for i in chunk])):
                results[i] = result
            bar.update(len(chunk))
    return results
