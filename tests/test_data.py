"""SQuAD loading, the seed's template, truncation, loss masks and batching."""
import json
import subprocess
import sys

import pytest

from conftest import DEV_FILE, ROOT
from data.batching import collate, plan_epoch, training_steps
from data.prompts import NO_ANSWER, encode_prompt, format_text, prompt_tokens, training_sequences
from data.squad import SquadExample, load_split, load_squad_file
from gpt2 import EOS_ID, UserError, get_tokenizer

ANSWERABLE = SquadExample("a1", "Paris is the capital of France.", "What is the capital of France?", ["Paris"])
UNANSWERABLE = SquadExample("u1", "Paris is the capital of France.", "What is the capital of Spain?", [])


def decode(ids):
    return get_tokenizer().decode(ids)


def test_template_is_the_seeds_byte_for_byte():
    (ids, first), (ids_u, _) = training_sequences([ANSWERABLE, UNANSWERABLE], 1024, add_eos=True, loss_on="all",
                                                  seed=0)[0]
    assert decode(ids) == ("CONTEXT:\nParis is the capital of France.\n\nQUESTION:\nWhat is the capital of "
                           "France?\n\nANSWER:\nParis<|endoftext|>")
    assert decode(ids_u) == ("CONTEXT:\nParis is the capital of France.\n\nQUESTION:\nWhat is the capital of "
                             "Spain?\n\nANSWER:\nCannot Find Answer<|endoftext|>")
    assert NO_ANSWER == "Cannot Find Answer" and first == 0
    (no_eos, _), = training_sequences([ANSWERABLE], 1024, add_eos=False, loss_on="all", seed=0)[0]
    assert no_eos == get_tokenizer().encode_ordinary(format_text(ANSWERABLE.context, ANSWERABLE.question, "Paris"))


def test_pieces_tokenize_like_the_whole_text_on_the_dev_set():
    examples = load_squad_file(DEV_FILE)[::7]
    enc = get_tokenizer()
    for ex, prompt in zip(examples, prompt_tokens(examples, 1024)[0]):
        assert prompt == enc.encode_ordinary(format_text(ex.context, ex.question))


def test_one_of_several_gold_answers_is_drawn_with_the_seed():
    examples = [SquadExample(str(i), "c", "q", ["alpha", "beta", "gamma"]) for i in range(30)]
    first = [decode(ids) for ids, _ in training_sequences(examples, 64, True, "all", seed=1)[0]]
    again = [decode(ids) for ids, _ in training_sequences(examples, 64, True, "all", seed=1)[0]]
    other = [decode(ids) for ids, _ in training_sequences(examples, 64, True, "all", seed=2)[0]]
    assert first == again and first != other
    assert {text.split("ANSWER:\n")[1] for text in first} == {f"{a}<|endoftext|>" for a in ("alpha", "beta", "gamma")}


def test_truncation_shortens_only_the_context():
    long = SquadExample("l", " ".join(f"word{i}" for i in range(600)), "Which word comes first?", ["word0"])
    (ids, first), = training_sequences([long], 100, add_eos=True, loss_on="answer", seed=0)[0]
    text = decode(ids)
    assert len(ids) == 100
    assert text.startswith("CONTEXT:\nword0 word1")
    assert text.endswith("\n\nQUESTION:\nWhich word comes first?\n\nANSWER:\nword0<|endoftext|>")
    assert encode_prompt(get_tokenizer().encode_ordinary(long.context), long.question, 10) is None
    sequences, skipped = training_sequences([long, ANSWERABLE], 12, add_eos=True, loss_on="all", seed=0)
    assert skipped == 2 and sequences == []  # even an empty context leaves no room: skipped, and counted


def test_loss_mask_all_tokens_or_answer_only():
    (ids, first), = training_sequences([ANSWERABLE], 1024, True, "all", seed=0)[0]
    batch = collate([(ids, first)])
    assert batch.targets.tolist() == ids[1:] and batch.target_positions.tolist() == list(range(len(ids) - 1))
    (ids, first), = training_sequences([ANSWERABLE], 1024, True, "answer", seed=0)[0]
    batch = collate([(ids, first)])
    assert decode(batch.targets.tolist()) == "Paris<|endoftext|>"
    # Each target is the token right after its position: position p predicts ids[p + 1].
    assert all(ids[p + 1] == t for p, t in zip(batch.target_positions.tolist(), batch.targets.tolist()))


def test_padding_never_carries_loss():
    sequences = [(list(range(1, n + 1)), 0) for n in (3, 9, 5)]
    batch = collate(sequences)
    T = batch.input_ids.shape[1]
    assert batch.input_ids.shape == (3, 9) and batch.n_real == 17 and batch.n_padded == 27
    for position, target in zip(batch.target_positions.tolist(), batch.targets.tolist()):
        row, column = divmod(position, T)
        assert column + 1 < len(sequences[row][0]) and target == sequences[row][0][column + 1]
    assert (batch.input_ids[0, 3:] == EOS_ID).all()


def test_epoch_plan_covers_every_example_once_in_length_sorted_micro_batches():
    lengths = [(i * 37) % 101 for i in range(103)]
    plan = plan_epoch(lengths, examples_per_step=10, micro_batch_size=3, seed=5, epoch=0)
    seen = [i for step in plan for micro in step for i in micro]
    assert len(plan) == 10 and len(seen) == len(set(seen)) == 100  # the incomplete last step is dropped
    for step in plan:
        assert [len(m) for m in step] == [3, 3, 3, 1]
        flat = [lengths[i] for m in step for i in m]
        assert flat == sorted(flat, reverse=True)
    assert plan == plan_epoch(lengths, 10, 3, seed=5, epoch=0)
    assert plan != plan_epoch(lengths, 10, 3, seed=5, epoch=1)


def test_training_steps_resume_mid_stream_and_deal_micro_batches_to_ranks():
    sequences = [([7] * (n % 13 + 2), 0) for n in range(40)]
    straight = [[b.input_ids.tolist() for b in step] for _, step in zip(range(12), training_steps(sequences, 2, 3, 0))]
    resumed = [[b.input_ids.tolist() for b in step] for _, step in zip(range(7), training_steps(sequences, 2, 3, 0, 5))]
    assert straight[5:] == resumed  # crosses the epoch boundary (6 steps per epoch)
    both = zip(training_steps(sequences, 2, 3, 0, rank=0, world_size=2), training_steps(sequences, 2, 3, 0, rank=1,
                                                                                        world_size=2))
    step0, step1 = next(both)
    assert len(step0) == len(step1) == 3
    with pytest.raises(UserError, match="do not fill one step"):
        next(training_steps(sequences[:5], 2, 3, 0))


def test_malformed_or_missing_squad_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no SQuAD file at .*nope.json"):
        load_squad_file(tmp_path / "nope.json")
    with pytest.raises(UserError, match="holds no dev-v2.0.json.*--data-dir DIR .* or --eval-file FILE"):
        load_split("eval", data_dir=str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json is not a SQuAD 2.0 JSON file"):
        load_squad_file(tmp_path / "bad.json")
    (tmp_path / "shape.json").write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": 1}]}]}]}))
    with pytest.raises(UserError, match=r"shape.json: data\[0\].paragraphs\[0\].qas\[0\].id is not in SQuAD format: it must be a string"):
        load_squad_file(tmp_path / "shape.json")


def test_dev_file_loads_in_file_order():
    examples = load_split("eval", file=str(DEV_FILE))
    assert len(examples) == 11873 and sum(not ex.answers for ex in examples) == 5945
    assert examples[0].question == "In what country is Normandy located?" and examples[0].answers[0] == "France"
    assert load_split("eval", data_dir=str(DEV_FILE.parent))[100] == examples[100]


def test_train_py_without_network_names_the_local_options(tmp_path):
    """No network and nothing cached: the Hub's SQuAD cannot load, and the message says how to give local files
    (huggingface_hub retries for a while first, unless HF_HUB_OFFLINE=1)."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "run")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--data-dir DIR" in result.stderr and "--train-file / --eval-file" in result.stderr


def test_prompts_count_the_contexts_cut_to_fit():
    examples = load_squad_file(DEV_FILE)[::7]
    enc = get_tokenizer()
    whole = [len(enc.encode_ordinary(format_text(ex.context, ex.question))) for ex in examples]
    prompts, cut = prompt_tokens(examples, 200)
    assert cut == sum(n > 200 for n in whole) > 0
    assert all(len(p) == min(n, 200) for p, n in zip(prompts, whole))
    assert prompt_tokens(load_squad_file(DEV_FILE), 1024 - 128)[1] == 0  # the longest dev prompt: 837 tokens
