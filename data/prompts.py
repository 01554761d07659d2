"""The seed's text template, and questions turned into token sequences for training and for answering.

    CONTEXT:\\n{context}\\n\\nQUESTION:\\n{question}\\n\\nANSWER:\\n{answer}

The model reads everything up to and including "\\n\\nANSWER:\\n" and writes the answer. Texts are tokenized
in pieces (template, context, question, answer) so the context can be shortened without touching the rest;
on the 11,873 dev questions the pieces give exactly the tokens of the whole string.
"""
import random
from collections.abc import Sequence

from gpt2 import EOS_ID, UserError, get_tokenizer

from .squad import SquadExample

NO_ANSWER = "Cannot Find Answer"  # what the seed trains the model to say to an unanswerable question
ANSWER_MARKER = "\n\nANSWER:\n"
LOSS_ON = ("all", "answer")
# The seed's qualitative example (a Winograd schema); the seed answered "the brown suitcase."
WINOGRAD = ("The trophy doesn't fit into the brown suitcase because it's too small.", "What is too small?")


def format_text(context: str, question: str, answer: str = "") -> str:
    """The seed's template, byte for byte; without `answer`, the prompt the model answers."""
    return f"CONTEXT:\n{context}\n\nQUESTION:\n{question}{ANSWER_MARKER}{answer}"


def encode_prompt(context_ids: Sequence[int], question: str, max_tokens: int) -> tuple[list[int], int] | None:
    """(prompt tokens, context tokens cut): the context is cut from the end to fit `max_tokens`. None if the
    question alone does not fit."""
    enc = get_tokenizer()
    head = enc.encode_ordinary("CONTEXT:\n")
    tail = enc.encode_ordinary(format_text("", question)[len("CONTEXT:\n"):])  # "\n\nQUESTION:\n...ANSWER:\n"
    room = max_tokens - len(head) - len(tail)
    if room < 0:
        return None
    return head + list(context_ids[:room]) + tail, max(0, len(context_ids) - room)


def answer_tokens(answer: str, add_eos: bool) -> list[int]:
    """The tokens the model is trained to write after the prompt: the answer, then EOS unless `add_eos` is off
    (--no-eos). For an unanswerable question: "Cannot Find Answer" = C|annot| Find| Answer, then EOS."""
    return get_tokenizer().encode_ordinary(answer) + ([EOS_ID] if add_eos else [])


def encode_training_example(context_ids: Sequence[int], question: str, answer: str, max_len: int,
                            add_eos: bool, loss_on: str) -> tuple[list[int], int] | None:
    """(token ids, first loss position), or None if question and answer alone exceed `max_len`.

    Position i predicts token i + 1, so positions first..len-2 carry loss: all of them (`loss_on="all"`, like
    the seed), or only those predicting the answer and EOS (`loss_on="answer"`). EOS after the answer teaches
    the model to stop; the seed had none, so its model rambles on until the token limit.
    """
    answer_ids = answer_tokens(answer, add_eos)
    encoded = encode_prompt(context_ids, question, max_len - len(answer_ids))
    if encoded is None:
        return None
    prompt, _ = encoded
    return prompt + answer_ids, 0 if loss_on == "all" else len(prompt) - 1


def training_sequences(examples: Sequence[SquadExample], max_len: int, add_eos: bool, loss_on: str,
                       seed: int) -> tuple[list[tuple[list[int], int]], int]:
    """Every example that fits as (ids, first loss position), and how many did not fit.

    The answer: `NO_ANSWER` for unanswerable questions; with several gold answers, one drawn with a seeded RNG.
    """
    rng = random.Random(seed)
    contexts = _tokenized_contexts(examples)
    sequences, skipped = [], 0
    for ex in examples:
        answer = rng.choice(ex.answers) if ex.answers else NO_ANSWER
        sequence = encode_training_example(contexts[ex.context], ex.question, answer, max_len, add_eos, loss_on)
        if sequence is None:
            skipped += 1
        else:
            sequences.append(sequence)
    return sequences, skipped


def prompt_tokens(examples: Sequence[SquadExample], block_size: int,
                  max_new_tokens: int = 0) -> tuple[list[list[int]], int]:
    """The prompt of every example, contexts shortened so that the prompt and `max_new_tokens` fit the model's
    `block_size` tokens; and how many contexts were shortened (their answers come from a text cut short, which the
    user should know)."""
    contexts = _tokenized_contexts(examples)
    max_tokens = block_size - max_new_tokens
    encoded = [encode_prompt(contexts[ex.context], ex.question, max_tokens) for ex in examples]
    too_long = [ex for ex, e in zip(examples, encoded) if e is None]
    if too_long:
        need, longest = max((len(encode_prompt([], ex.question, block_size * 1000)[0]), ex.id)
                            for ex in too_long)
        problem = (f"{len(too_long)} question(s) do not fit {max_tokens} prompt tokens even without their context: "
                   f"{longest} alone needs {need}")
        if need >= block_size:
            raise UserError(f"{problem}, more than the model's {block_size}-token window holds: shorten that "
                            f"question or leave it out")
        raise UserError(f"{problem}, and {max_new_tokens} of the model's {block_size} tokens are kept for the "
                        f"answer: lower --max-new-tokens to {block_size - need} or less")
    return [prompt for prompt, _ in encoded], sum(cut > 0 for _, cut in encoded)


def _tokenized_contexts(examples: Sequence[SquadExample]) -> dict[str, list[int]]:
    """Each distinct context tokenized once: about five questions share a paragraph."""
    unique = list(dict.fromkeys(ex.context for ex in examples))
    return dict(zip(unique, get_tokenizer().encode_ordinary_batch(unique)))
