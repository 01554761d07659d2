"""Where a model goes wrong: its answers broken down by kind of question, and its worst answers.

    abstention        answerable / unanswerable x answered / abstained: the four counts
    by question word  what / who / when / where / which / how / why / other: count, EM, F1
    by answer length  the shortest gold answer in words (F1's tokens), "no answer" for unanswerable questions
    worst             of each kind of mistake, the most confident ones first

Each table counts every question once, so its counts add up to the number of questions. EM and F1 are the official
SQuAD 2.0 scores of each question (data/metrics.py), in percent.
"""
import re
from collections.abc import Sequence

from .metrics import exact_match, f1, normalize_answer
from .squad import SquadExample

QUESTION_WORDS = ("what", "who", "when", "where", "which", "how", "why", "other")
_WORD_OF = {"what": "what", "who": "who", "whom": "who", "whose": "who", "when": "when", "where": "where",
            "which": "which", "how": "how", "why": "why"}
ANSWER_LENGTHS = ("no answer", "1 word", "2 words", "3 words", "4-5 words", "6-10 words", "11+ words")
MISTAKES = {  # kind -> what makes a question one of them
    "wrong answer": "answerable, answered, F1 below 100",
    "missed answer": "answerable, but the model abstained",
    "made-up answer": "unanswerable, but the model answered",
}


def question_word(question: str) -> str:
    """The first wh-word of the question ("In what year...?" -> what; whom, whose -> who), else "other"."""
    for word in re.findall(r"[a-z]+", question.lower()):
        if word in _WORD_OF:
            return _WORD_OF[word]
    return "other"


def answer_length(golds: list[str]) -> str:
    """The bucket of the shortest gold answer's length in words, as F1 counts them (after normalisation)."""
    if not golds:
        return "no answer"
    words = min(len(normalize_answer(g).split()) for g in golds)
    if words <= 3:
        return ANSWER_LENGTHS[max(words, 1)]
    return "4-5 words" if words <= 5 else "6-10 words" if words <= 10 else "11+ words"


def breakdown(examples: Sequence[SquadExample], predictions: dict[str, str],
              na_probs: dict[str, float] | None = None, worst: int = 5) -> dict:
    """The tables above for official-format predictions ("" = abstained), as JSON-ready dicts.

    `worst` examples of each mistake: wrong answers by lowest F1; with `na_probs`, missed answers by highest
    na_prob (the most confident abstentions) and made-up answers by lowest na_prob; else in question order."""
    rows = []
    for ex in examples:
        prediction = predictions[ex.id]
        rows.append({"id": ex.id, "question": ex.question, "gold": ex.answers, "prediction": prediction,
                     "exact": 100 * exact_match(prediction, ex.answers), "f1": 100 * f1(prediction, ex.answers),
                     "na_prob": None if na_probs is None else na_probs[ex.id]})
    table = {has: {"answered": 0, "abstained": 0} for has in ("answerable", "unanswerable")}
    for row in rows:
        table["answerable" if row["gold"] else "unanswerable"]["answered" if row["prediction"] else "abstained"] += 1
    by_word = _mean_scores(rows, lambda row: question_word(row["question"]), QUESTION_WORDS)
    by_length = _mean_scores(rows, lambda row: answer_length(row["gold"]), ANSWER_LENGTHS)

    confidence = (lambda row: row["na_prob"]) if na_probs is not None else (lambda row: 0.0)
    mistakes = {
        "wrong answer": sorted((r for r in rows if r["gold"] and r["prediction"] and r["f1"] < 100),
                               key=lambda r: (r["f1"], confidence(r))),
        "missed answer": sorted((r for r in rows if r["gold"] and not r["prediction"]), key=lambda r: -confidence(r)),
        "made-up answer": sorted((r for r in rows if not r["gold"] and r["prediction"]), key=confidence),
    }
    return {"questions": len(rows), "abstention": table, "by_question_word": by_word, "by_answer_length": by_length,
            "worst": {kind: found[:worst] for kind, found in mistakes.items()}}


def _mean_scores(rows: list[dict], group, groups: Sequence[str]) -> dict[str, dict]:
    """For each group in `groups` order (empty ones left out): its count and mean EM and F1."""
    members = {g: [] for g in groups}
    for row in rows:
        members[group(row)].append(row)
    return {g: {"count": len(found), "exact": sum(r["exact"] for r in found) / len(found),
                "f1": sum(r["f1"] for r in found) / len(found)} for g, found in members.items() if found}


def to_markdown(metrics: dict, tables: dict, title: str = "Evaluation") -> str:
    """The metrics and the breakdown as a Markdown report (also readable as plain text in a terminal)."""
    lines = [f"# {title}", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    return "\n".join(lines) + "\n\n" + breakdown_markdown(tables)


def breakdown_markdown(tables: dict) -> str:
    """The breakdown's tables and worst examples in Markdown, as evaluate.py prints them."""
    t = tables["abstention"]
    lines = [f"## Answered or abstained ({tables['questions']} questions)", "",
              "| | answered | abstained |", "| --- | --- | --- |",
              f"| answerable | {t['answerable']['answered']} | {t['answerable']['abstained']} |",
              f"| unanswerable | {t['unanswerable']['answered']} | {t['unanswerable']['abstained']} |"]
    for heading, key in (("By question word", "by_question_word"), ("By gold answer length", "by_answer_length")):
        lines += ["", f"## {heading}", "", "| | questions | EM | F1 |", "| --- | --- | --- | --- |"]
        lines += [f"| {g} | {s['count']} | {s['exact']:.1f} | {s['f1']:.1f} |" for g, s in tables[key].items()]
    lines += ["", "## Worst examples"]
    for kind, found in tables["worst"].items():
        lines += ["", f"### {kind} ({MISTAKES[kind]})", ""]
        if not found:
            lines.append("none")
        for row in found:
            na = "" if row["na_prob"] is None else f", na_prob {row['na_prob']:.3g}"
            lines.append(f"- {_cell(row['question'])} gold: {_cell(' | '.join(row['gold']) or '(no answer)')}; "
                         f"answer: {_cell(row['prediction'] or '(abstained)')} (F1 {row['f1']:.0f}{na})")
    return "\n".join(lines) + "\n"


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"


def _cell(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
