"""RAFT training records: each question with the pairs the retriever returns for it.

A grounded adapter reads `llm.grounding.grounded_question(question, references)` and answers from
the references (RAFT, Zhang et al. 2024). So it is trained on exactly that: for each training
pair, several questions, each with the k pairs the serving retriever returns for it, the gold pair
at a seeded random position; in a share of the examples the gold pair is left out (the next
retrieved pair takes its place) and the target is `TRAINED_FALLBACK`, so that the model learns to
say it does not know. The records are plain {"instruction", "input", "output"} dicts: the usual
`encode_example` and training loop train them unchanged.

Why several questions per pair: a first version trained on the curated questions alone (3 or 8
epochs, 35% without the gold pair) fell back on almost every unseen paraphrase (5-8% of key
facts): it learned "copy when the question stands verbatim in the references, else give up".
Serving only reaches the model when the best match is NOT a near-verbatim one (those answer with
the curated text), so the training questions must differ from the references' questions: the
pair's alternates, and paraphrase-like rewrites of its question (`paraphrases`). Dev pairs and
the out-of-scope set are never read here: the caller passes the training entries only.

Pure Python: no Django, no torch (the index is any object with `search(query, k=)`, such as
llm.retrieval.Index built over the training pairs only).
"""

import random
import re
from dataclasses import dataclass

from llm.finetune.config import read_saved_record
from llm.grounding import DEFAULT_K, GROUNDING_FORMAT, NONE, SELECT_FORMAT, TRAINED_FALLBACK, grounded_question, selection_question
from llm.prompting import question_text
from llm.retrieval import customer_text

DEFAULT_NO_GOLD_SHARE = 0.25
DEFAULT_VARIANTS = 2  # questions per pair besides its own: its alternates first, then rewrites

# Everyday rewrites of customer questions, each way round: (written, also said as).
SYNONYMS = (
    ("可以", "能"), ("怎么", "如何"), ("怎么", "咋"), ("多久", "多长时间"), ("多久", "几天"), ("东西", "商品"),
    ("运费", "快递费"), ("退款", "退钱"), ("账号", "账户"), ("查看", "看"), ("申请", "办理"), ("为什么", "为啥"),
    ("是否", "能不能"), ("怎样", "怎么"), ("哪里", "哪儿"), ("什么时候", "啥时候"), ("什么", "啥"), ("多少钱", "多少"),
    ("订单", "单子"), ("购买", "买"), ("收到", "拿到"), ("需要", "要"), ("取消", "撤销"), ("修改", "改"),
)
OPENINGS = ("请问", "你好，", "您好，想问一下，", "问下，", "咨询一下，", "我想知道")
ENDINGS = ("？", "呢？", "啊？", "")


@dataclass(frozen=True)
class Reference:
    """A pair as the reference block shows it (what a retrieval hit carries)."""

    question: str
    answer: str


@dataclass(frozen=True)
class Grounding:
    """How a grounded adapter reads its references: the rendering and how many pairs."""

    format: str
    k: int
    select: str | None = None  # SELECT_FORMAT: also trained to pick the matching pair (None: not)


def grounding_record(k=DEFAULT_K, *, select=True):
    """What train() adds to the adapter's finetune_config.json for a RAFT-trained adapter (select:
    also trained on `selection_records`)."""
    return {"grounding": GROUNDING_FORMAT, "k": k, **({"select": SELECT_FORMAT} if select else {})}


def read_grounding(adapter_dir):
    """The grounding an adapter was trained with, or None for one trained on bare questions
    (every adapter trained before RAFT): serve those the old way."""
    record = read_saved_record(adapter_dir)
    if not record.get("grounding"):
        return None
    return Grounding(format=record["grounding"], k=int(record.get("k") or DEFAULT_K), select=record.get("select") or None)


def paraphrases(question, rng, count):
    """Up to `count` rewrites of `question` that differ from it and from each other.

    Cheap and rule-based (no model): the speaker dropped, everyday synonyms swapped, an opening
    or ending changed, a leading clause left out. Enough that the question is no longer a
    substring of the references, which is what serving's grounded mode sees.
    """
    base = customer_text(question)
    found, tries = [], 0
    while len(found) < count and tries < 20 * max(count, 1):
        tries += 1
        text = _rewrite(base, rng)
        if text and text not in (question, base) and text not in found:
            found.append(text)
    return found


def _rewrite(text, rng):
    swaps = [pair if rng.random() < 0.5 else pair[::-1] for pair in SYNONYMS]
    rng.shuffle(swaps)
    changed = 0
    for old, new in swaps:
        # one character alone is too often part of another word (要 in 想要): only whole words are swapped in
        if len(old) > 1 and old in text and changed < 3 and not (new in text and old in new):
            text = text.replace(old, new, 1)
            changed += 1
    clauses = [c for c in re.split(r"[，,]", text) if c.strip()]
    if len(clauses) > 1 and rng.random() < 0.4:
        text = "，".join(clauses[1:])  # the question part usually comes last
    body = text.rstrip("？?！!。. ")
    body = re.sub(r"^(请问|你好|您好)[，,]?", "", body)
    if rng.random() < 0.6:
        body = rng.choice(OPENINGS) + body
    return body + (rng.choice(("？", "")) if body.endswith(("吗", "呢", "么")) else rng.choice(ENDINGS))


def training_questions(entry, rng, variants=DEFAULT_VARIANTS):
    """The pair's question and `variants` more: its alternates (staff wrote them: real variety)
    first, then paraphrase-like rewrites of its question for the rest. A fixed number per pair
    keeps a run's size, and so its time, the same whether or not the pairs have alternates."""
    alternates = [a.strip() for a in entry.alternates if a and a.strip() and a.strip() != entry.question.strip()]
    questions = list(dict.fromkeys([entry.question.strip(), *alternates[:variants]]))
    rewrites, tries = [], 0
    while len(questions) + len(rewrites) < variants + 1 and tries < 4 * (variants + 1):
        tries += 1
        rewrites += [p for p in paraphrases(entry.question, rng, 1) if p not in questions and p not in rewrites]
    return questions + rewrites


def raft_records(entries, index, *, k=DEFAULT_K, no_gold_share=DEFAULT_NO_GOLD_SHARE, variants=DEFAULT_VARIANTS, seed=42):
    """RAFT training records for the training `entries` (llm.retrieval.Entry), retrieved from
    `index` (built over those entries only). Deterministic for the same entries, index and seed.

    Exactly round(no_gold_share * n) of the n examples leave the gold pair out (a seeded choice)
    and answer TRAINED_FALLBACK; the others hold it at a seeded random position among the k.
    """
    if not 0.0 <= no_gold_share <= 1.0:
        raise ValueError(f"no_gold_share must be between 0 and 1, not {no_gold_share!r}")
    rng = random.Random(seed)
    asked = [(entry, question) for entry in entries for question in training_questions(entry, rng, variants)]
    no_gold = set(rng.sample(range(len(asked)), round(no_gold_share * len(asked))))
    records = []
    for number, (entry, question) in enumerate(asked):
        references, position = _retrieved(entry, question, index, k, rng, leave_out=number in no_gold)
        if references:
            output = entry.answer if position else TRAINED_FALLBACK
            records.append({"instruction": grounded_question(question, references), "input": "", "output": output})
    return records


def _retrieved(entry, question, index, k, rng, *, leave_out):
    """The k pairs retrieved for `question` asked of `entry`, as references: without the gold
    pair when `leave_out` (the next retrieved one takes its place), else with it at a seeded
    random position. Returns (references, the gold's 1-based position or None).

    A retrieved pair with the gold's very answer counts as the gold (it is not a distractor).
    """
    hits = index.search(question, k=k + 1)
    gold_answer = entry.answer.strip()
    others = [Reference(h.question, h.answer) for h in hits if h.pair_id != entry.pair_id and h.answer.strip() != gold_answer]
    if leave_out:
        return others[:k], None
    references = others[: k - 1]
    position = rng.randrange(len(references) + 1)
    references.insert(position, Reference(entry.question, entry.answer))
    return references, position + 1


def grounded_dev_records(dev_records, index, *, k=DEFAULT_K):
    """Dev records as a grounded adapter is asked them: the question with what the training-only
    index returns for it (the dev pair itself is never in it), for the dev loss."""
    grounded = []
    for record in dev_records:
        question = customer_text(question_text(record["instruction"], record.get("input", "")))
        hits = index.search(question, k=k)
        references = [Reference(h.question, h.answer) for h in hits]
        grounded.append({"instruction": grounded_question(question, references), "input": "", "output": record["output"]})
    return grounded


def selection_records(entries, index, *, k=DEFAULT_K, none_share=DEFAULT_NO_GOLD_SHARE, variants=DEFAULT_VARIANTS, seed=42):
    """Training records that teach the adapter to name the matching pair (llm.grounding.choose):
    for each of the pair's other questions (its alternates, then rewrites: training_questions
    without the curated question itself), the questions of k retrieved pairs with the gold
    pair's at a seeded random position and its number as the target; in round(none_share * n)
    of them the gold pair is left out and the target is NONE.

    The curated question is never the one asked: serving puts a question to the pick only below
    the curated threshold, never one standing word for word among the candidates, and a first
    version trained with it (and only rule-based rewrites besides, no alternates) learned to
    match strings: on the sample data it answered NONE for every unseen paraphrase it was asked
    (15 of 24 dev questions, benchmarks/README.md).

    Short (questions only, a one-token answer): about a fifth of a RAFT example's tokens.
    """
    if not 0.0 <= none_share <= 1.0:
        raise ValueError(f"none_share must be between 0 and 1, not {none_share!r}")
    if not 1 <= k <= 9:
        raise ValueError(f"k must be from 1 to 9 (one digit answers), not {k}")
    rng = random.Random(f"select:{seed}")
    asked = [(entry, question) for entry in entries for question in training_questions(entry, rng, variants)[1:]]
    none = set(rng.sample(range(len(asked)), round(none_share * len(asked))))
    records = []
    for number, (entry, question) in enumerate(asked):
        candidates, position = _retrieved(entry, question, index, k, rng, leave_out=number in none)
        if candidates:
            output = str(position) if position else NONE
            records.append({"instruction": selection_question(customer_text(question), candidates), "input": "", "output": output})
    return records
