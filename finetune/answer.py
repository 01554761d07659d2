"""Batched greedy answers to SQuAD questions, the model's probability of abstaining, and the seed's rules for
reading an answer.

A generative model has no "null score" as an extractive one has, so SQuAD 2.0's no-answer probability is computed
as what it literally is: the probability that the model writes the abstention it was trained to write. With it, a
threshold decides instead of greedy decoding: abstain when na_prob > threshold, else give the best answer that is
not an abstention (see answer(): forbid_abstention).
"""
import math
import re
import sys
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from data.metrics import normalize_answer
from data.prompts import ANSWER_MARKER, NO_ANSWER, answer_tokens, prompt_tokens
from data.squad import SquadExample
from gpt2 import EOS_ID, GPT, continuation_log_prob, generate, get_tokenizer

# "Cannot Find Answer" at the end of a text, in any case and punctuation, its first letter (or word) optional
ABSTENTION_AT_END = re.compile(r"\W*(c?annot\W+)?find\W+answer\W*$", re.IGNORECASE)
NEAR_UNIFORM_NA_PROB = 1e-6  # below this everywhere, na_prob ranks questions but is no probability to read


def clean_answer(generated: str) -> str:
    """The seed's rule: the answer is the generated text up to a repeated "ANSWER:" marker."""
    return generated.split(ANSWER_MARKER)[0].strip()


def without_abstention(text: str) -> str:
    """The answer with the abstention's words cut off its end. A model trained to abstain and forbidden to start
    with "C" still writes the rest of its abstention after another first token: "annot Find Answer", "parsannot
    Find Answer", "pars Find Answer", or "\ufffdannot Find Answer" after a lone byte of a multi-byte character
    (decoded as U+FFFD). What it wrote before them ("pars") is its answer."""
    return ABSTENTION_AT_END.sub("", text)


def is_abstention(text: str) -> bool:
    """Whether an answer says nothing but "no answer", in any spelling: empty as SQuAD's scoring normalizes it ("",
    "the", "."), or the abstention's words alone, in any case and punctuation, with or without its first letter."""
    return normalize_answer(without_abstention(text)) == ""


def official_answer(text: str) -> str:
    """SQuAD's predictions format: "" means no answer (the model says "Cannot Find Answer")."""
    return "" if text.strip() == NO_ANSWER else text


@torch.no_grad()
def answer(model: GPT, examples: list[SquadExample], batch_size: int, max_new_tokens: int,
           progress: bool = True, forbid_abstention: bool = False) -> list[str]:
    """Greedy answers to every question, in order.

    forbid_abstention: the best answer that is not an abstention, decided on the decoded text. "Cannot Find Answer"
    is the tokens C|annot| Find| Answer, so "C" and EOS (an empty answer abstains too) may not be the first token,
    and the abstention's words are cut off the end of what is written instead (without_abstention). Where nothing
    is left (the first token began another spelling of the abstention: "annot", "\ufffd"), that token is forbidden
    too and the question is answered again. Forbidding "C" also rules out the few answers that start with the bare
    token "C" ("Cape Town" is C|ape| Town): 29 of the dev set's 5,928 first gold answers (0.5%).

    Says on stderr how many contexts were cut to fit.
    """
    enc = get_tokenizer()
    prompts, cut = prompt_tokens(examples, model.config.block_size, max_new_tokens)
    if cut:
        print(f"note: {cut} of {len(prompts)} context(s) cut at the end to fit {model.config.block_size - max_new_tokens} "
              f"prompt tokens ({model.config.block_size} minus {max_new_tokens} for the answer): their answers come "
              f"from the part that fits", file=sys.stderr)
    stop = [enc.encode_ordinary(ANSWER_MARKER)]

    def generated(indices: list[int], forbid: list[frozenset[int]], desc: str) -> list[list[int]]:
        """The new tokens for prompts[indices], each question's first token not in its `forbid` set."""
        def run(batch: list[int]) -> list[list[int]]:
            return generate(model, [prompts[indices[j]] for j in batch], max_new_tokens, stop_sequences=stop,
                            forbid_first=[sorted(forbid[j]) for j in batch])
        return _longest_first([len(prompts[i]) for i in indices], batch_size, run, desc, progress)

    if not forbid_abstention:
        return _longest_first([len(p) for p in prompts], batch_size,
                              lambda batch: answer_prompts(model, [prompts[i] for i in batch], max_new_tokens),
                              "answering", progress)
    everyone = list(range(len(prompts)))
    texts = [""] * len(prompts)
    forbidden = {i: frozenset((answer_tokens(NO_ANSWER, add_eos=False)[0], EOS_ID)) for i in everyone}
    desc = "answering"
    while forbidden:  # each pass forbids one more first token to every question still abstaining: it ends
        indices = list(forbidden)
        for i, tokens in zip(indices, generated(indices, [forbidden[i] for i in indices], desc)):
            texts[i] = without_abstention(clean_answer(enc.decode(tokens)))
            if is_abstention(texts[i]):  # a row that stopped at once, at the "ANSWER:" marker, has no first token
                forbidden[i] |= {tokens[0] if tokens else stop[0][0]}
            else:
                del forbidden[i]
        desc = "answering again, where the first token began another spelling of the abstention"
    return texts


@torch.no_grad()
def answer_prompts(model: GPT, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """answer()'s work on one batch of prompt tokens: greedy decoding up to a repeated "ANSWER:" marker."""
    enc = get_tokenizer()
    outputs = generate(model, prompts, max_new_tokens, stop_sequences=[enc.encode_ordinary(ANSWER_MARKER)])
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

    def probabilities(batch: list[int]) -> list[float]:
        return abstention_probabilities(model, [prompts[i] for i in batch], add_eos)
    return _longest_first([len(p) for p in prompts], batch_size, probabilities, "no-answer probabilities", progress)


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


def na_prob_note(na_probs: Sequence[float]) -> str | None:
    """One line for a model whose na_probs are all tiny, as a near-uniform model's are: the abstention is several
    tokens, each about 1/50,257 likely, so their product is about 1e-21 even where the model abstains greedily."""
    if not na_probs or max(na_probs) >= NEAR_UNIFORM_NA_PROB:
        return None
    return (f"note: every na_prob is below {NEAR_UNIFORM_NA_PROB:g} (largest {max(na_probs):.2g}): the model's "
            f"next-token probabilities are nearly uniform, so na_prob only ranks the questions; a trained model's "
            f"are near 1 where it abstains")


def timing(decoded: int, total: int, seconds: float, na_seconds: float) -> str:
    """How long answering took, in one line; a rate only where answers were decoded (a threshold may abstain on
    every question, decoding none)."""
    pace = f" ({decoded / seconds:.1f} per second)" if decoded and seconds > 0 else ""
    abstained = f", the threshold abstained on the other {total - decoded}" if decoded < total else ""
    return (f"answered {decoded} of {total} questions in {seconds:.1f} s{pace}{abstained}; the no-answer "
            f"probabilities took {na_seconds:.1f} s")


def _longest_first(lengths: list[int], batch_size: int, run: Callable[[list[int]], list], desc: str,
                   progress: bool) -> list:
    """run(batch of prompt positions) -> one result per prompt, applied to batches of prompts of similar `lengths`,
    longest first (little padding, and the largest batch comes first, so memory runs out at once if it must);
    results in prompt order."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    results = [None] * len(lengths)
    with tqdm(total=len(lengths), desc=desc, unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for i, result in zip(chunk, run(chunk)):
                results[i] = result
            bar.update(len(chunk))
    return results
