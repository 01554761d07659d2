"""Batched greedy answers to SQuAD questions, and the seed's rules for reading them."""
import sys

import torch
from tqdm import tqdm

from data.prompts import ANSWER_MARKER, NO_ANSWER, prompt_tokens
from data.squad import SquadExample
from gpt2 import GPT, generate, get_tokenizer


def clean_answer(generated: str) -> str:
    """The seed's rule: the answer is the generated text up to a repeated "ANSWER:" marker."""
    return generated.split(ANSWER_MARKER)[0].strip()


def official_answer(text: str) -> str:
    """SQuAD's predictions format: "" means no answer (the model says "Cannot Find Answer")."""
    return "" if text.strip() == NO_ANSWER else text


@torch.no_grad()
def answer(model: GPT, examples: list[SquadExample], batch_size: int, max_new_tokens: int,
           progress: bool = True) -> list[str]:
    """Greedy answers to every question, in order. Questions are answered longest first in batches of similar
    length (little padding), then put back in order. Says on stderr how many contexts were cut to fit."""
    enc = get_tokenizer()
    room = model.config.block_size - max_new_tokens
    prompts, cut = prompt_tokens(examples, room)
    if cut:
        print(f"note: {cut} of {len(prompts)} context(s) cut at the end to fit {room} prompt tokens "
              f"({model.config.block_size} minus {max_new_tokens} for the answer): their answers come from the part "
              f"that fits", file=sys.stderr)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stop = [enc.encode_ordinary(ANSWER_MARKER)]
    answers = [""] * len(prompts)
    with tqdm(total=len(prompts), desc="answering", unit="q", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            outputs = generate(model, [prompts[i] for i in chunk], max_new_tokens, stop_sequences=stop)
            for i, tokens in zip(chunk, outputs):
                answers[i] = clean_answer(enc.decode(tokens))
            bar.update(len(chunk))
    return answers
