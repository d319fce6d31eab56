"""Fidelity of grounded answers: key facts kept, numbers invented, modes and first tokens, asked
through the official `openai` client of a live daphne, before and after the first training run.

    .venv/bin/python benchmarks/fidelity.py                      # default training run (3 epochs)
    .venv/bin/python benchmarks/fidelity.py --epochs 1           # a quicker run
    .venv/bin/python benchmarks/fidelity.py --max-pairs 40 --epochs 1 --questions 10   # a smoke run
    .venv/bin/python benchmarks/fidelity.py --data-dir /tmp/csp-fidelity-x --skip-train   # ask again
    .venv/bin/python benchmarks/fidelity.py --untrained-only     # only the "no adapter yet" phase

What it does, as a new user would (issue 13, "Targets"):
1. A fresh CSP_DATA_DIR (SQLite), migrated; data/train.json imported as approved train pairs (the
   admin's import). ONLY the train pairs: the dev pairs are not in the knowledge base, so each
   data/dev.json question is an unseen paraphrase of a pair that is (its answer is a train
   pair's). A staff user, and a customer with a DRF token (the API key the client sends).
2. Phase "no adapter yet": a daphne (CSP_GROUNDING=true) is asked, one question at a time,
   streaming, model "default" (what the customers' chat serves), every train question, every dev
   question and every data/out_of_scope.json question. First token = the request to the first
   chunk with text; the final chunk's extra `csp` object gives the mode, the retrieved pair ids
   and the finish reason.
3. One training run with the default settings, as the admin's "train" action starts it
   (`training_run_start`, no hyper-parameters unless --epochs), executed here through the real
   django-q2 task function (`training.tasks.run_training`, as `manage.py train --wait` does);
   its wall time is measured. The first version a run saves is activated by the run itself.
4. Phase "trained": a new daphne, the same questions.

Scores per phase and set (llm.evaluation / llm.facts, the same definitions as the run page):
- key-fact recall: of the reference answer's key facts (llm.evaluation.key_facts), the share the
  answer states; summed over the set. Out-of-scope questions have no reference: not measured.
- invented: the share of answers stating a number (a fact of llm.facts other than a URL or an
  e-mail) that llm.facts.unsupported finds in none of: the reference, the answers of the pairs
  the server retrieved for it (csp.sources, read from the database), the question itself (what
  the customer said is not invented; the fact guard allows it too).
- mode shares, and first-token p50 / p95 per mode.
- "did you mean": of the fallback replies, how many offered close questions (csp.suggestions) and,
  for dev, how many had the right pair among them; "key facts within one click" counts a right
  suggestion as its curated answer (what a click on it gets). Reported beside the recall, which
  counts only what was answered.
An answer the fact guard replaced is scored by its replacement (a stream only appends: the
replacement follows what was shown after a blank line); "invented" counts what was shown too.

Targets (issue 13, Gemma-3-270M, trained): trained questions >= 99% of key facts; dev
paraphrases >= 95% of key facts and <= 1% of answers with an invented number; out-of-scope >= 90%
fallback and no invented number. Every answer is written to <data dir>/fidelity-<phase>.json (phase with dashes).
Nothing here is tuned on the dev or out-of-scope sets: they are only asked.
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import common

DEV_JSON = common.ROOT / "data" / "dev.json"
OUT_OF_SCOPE_JSON = common.ROOT / "data" / "out_of_scope.json"
MODES = ("curated", "grounded", "fallback")
SETS = ("trained", "dev", "out-of-scope")
# llm.facts kinds that are numbers (a URL or an e-mail is a fact of its own kind, not a number).
NUMBER_KINDS = {"number", "amount", "duration", "date", "phone"}
# The guard's replacements (finish reason in the final chunk's csp).
REPLACED = ("corrected", "fallback")
TARGETS = {
    "trained": "facts >= 99%",
    "dev": "facts >= 95%, invented <= 1%",
    "out-of-scope": "fallback >= 90%, invented 0",
}


def setup_django(data_dir, base):
    """Point this process at data_dir (SQLite, no Redis) and start Django; the daphnes inherit it."""
    for name in ("DATABASE_URL", "REDIS_URL"):
        os.environ.pop(name, None)
    os.environ.update(
        CSP_DATA_DIR=str(data_dir), CSP_BASE_MODEL=str(base), CSP_GROUNDING="true",
        DJANGO_SETTINGS_MODULE="csplatform.settings", PYTHONUNBUFFERED="1",
    )
    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise


def prepare(data_dir, max_pairs, *, alternates=True):
    """Migrate, import the train pairs as approved (without their alternate questions unless
    `alternates`), make the staff user and the customer's token."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    from knowledge import services

    call_command("migrate", "--no-input", verbosity=0)
    users = get_user_model().objects
    staff = users.create_superuser(username="admin", email="", password="a-long-benchmark-pass")
    customer = users.create_user(username="customer", password="a-long-benchmark-pass")
    records = common.records()[: max_pairs or None]
    if not alternates:
        records = [{key: value for key, value in record.items() if key != "alternates"} for record in records]
    report = services.qa_import(
        content=json.dumps(records, ensure_ascii=False).encode(), filename="train.json", status="approved", split="train", user=staff
    )
    if not report.committed:
        raise SystemExit(f"data/train.json did not import: {report.file_error or report.counts}")
    print(f"imported {report.counts['created']} approved train pairs into {data_dir}", flush=True)
    return staff, Token.objects.create(user=customer).key


def customer_key():
    from rest_framework.authtoken.models import Token

    return Token.objects.get(user__username="customer").key


def question_sets(max_questions):
    """{set: [(question as a customer types it, reference answer or None)]}.

    With fewer pairs loaded (--max-pairs), only the dev questions whose reference is a loaded
    pair's answer are asked (the others have no answer in the knowledge base)."""
    from knowledge.models import QAPair
    from llm.evaluation import normalise
    from llm.prompting import question_text
    from llm.retrieval import customer_text

    loaded = list(QAPair.objects.filter(status=QAPair.Status.APPROVED).order_by("id"))
    answers = {normalise(p.output) for p in loaded}
    dev = json.loads(DEV_JSON.read_text(encoding="utf-8"))
    oos = json.loads(OUT_OF_SCOPE_JSON.read_text(encoding="utf-8"))
    sets = {
        "trained": [(customer_text(question_text(p.instruction, p.input)), p.output) for p in loaded],
        "dev": [
            (customer_text(question_text(r["instruction"], r.get("input", ""))), r["output"])
            for r in dev if normalise(r["output"]) in answers
        ],
        "out-of-scope": [(item if isinstance(item, str) else item["question"], None) for item in oos],
    }
    return {name: items[: max_questions or None] for name, items in sets.items()}


# ---------------------------------------------------------------------------------------------
# asking


def ask(client, question):
    """Stream one answer: {"text", "final", "first_s", "total_s", "csp", "finish"}."""
    started = time.perf_counter()
    first, pieces, csp, finish = None, [], None, None
    stream = client.chat.completions.create(model="default", messages=[{"role": "user", "content": question}], stream=True)
    for chunk in stream:
        extra = chunk.model_extra or {}
        if extra.get("csp") is not None:
            csp = extra["csp"]
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                if first is None:
                    first = time.perf_counter() - started
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    total = time.perf_counter() - started
    text = "".join(pieces)
    final = text
    if csp and csp.get("finish_reason") in REPLACED and pieces and pieces[-1].startswith("\n\n"):
        final = pieces[-1][2:]  # the replacement, appended after what was shown
    return {"text": text, "final": final, "first_s": first, "total_s": total, "csp": csp or {}, "finish": finish}


def run_phase(phase, sets, args, data_dir):
    """Ask every question of every set through a fresh daphne; the answers, scored."""
    import openai

    from tests.support.livetest import live_daphne

    slug = phase.replace(" ", "-")
    log = Path(data_dir) / f"daphne-{slug}.log"
    env = {"CSP_GROUNDING": "true", "CSP_BASE_MODEL": str(args.base), "PYTHONUNBUFFERED": "1"}
    answers = []
    with live_daphne(env=env, log=log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=customer_key(), max_retries=0, timeout=args.timeout)
        started = time.perf_counter()
        for name in SETS:  # warm-up (retrieval index, embedder, engine and adapter load lazily): not counted
            if sets[name]:
                ask(client, sets[name][0][0])
        print(f"[{phase}] daphne at {url} warmed up in {time.perf_counter() - started:.1f} s; {common.load_average()}", flush=True)
        for name in SETS:
            started = time.perf_counter()
            for number, (question, reference) in enumerate(sets[name], start=1):
                answer = ask(client, question)
                answers.append({"phase": phase, "set": name, "question": question, "reference": reference, **answer})
                if number % 20 == 0:
                    print(f"  [{phase}] {name}: {number}/{len(sets[name])}", flush=True)
            print(f"  [{phase}] {name}: {len(sets[name])} questions in {time.perf_counter() - started:.0f} s", flush=True)
    score(answers)
    out = Path(data_dir) / f"fidelity-{slug}.json"
    out.write_text(json.dumps(answers, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"  answers written to {out}", flush=True)
    return answers


def score(answers):
    """Add per answer: mode, key facts wanted / found, exact match, invented numbers."""
    from knowledge.models import QAPair
    from llm import facts
    from llm.evaluation import key_facts, normalise

    outputs = dict(QAPair.objects.values_list("id", "output"))
    for a in answers:
        csp = a["csp"]
        a["mode"] = csp.get("mode") or "?"
        retrieved = [outputs[s["pair"]] for s in csp.get("sources", []) if s.get("pair") in outputs]
        sources = [a["question"], *retrieved, *([a["reference"]] if a["reference"] else [])]
        a["invented"] = [f.text for f in facts.unsupported(a["text"], sources) if f.kind in NUMBER_KINDS]
        # "did you mean": the questions a fallback offered; right when one is the reference's pair
        a["suggested"] = [outputs.get(offer["pair"]) for offer in csp.get("suggestions", [])]
        a["suggested_right"] = a["reference"] is not None and a["reference"] in a["suggested"]
        if a["reference"] is None:
            a["facts_wanted"] = a["facts_found"] = 0
            a["exact"] = None
            continue
        wanted = key_facts(a["reference"])
        stated = set(key_facts(a["final"]))
        a["facts_wanted"], a["facts_found"] = len(wanted), sum(f in stated for f in wanted)
        a["exact"] = normalise(a["final"]) == normalise(a["reference"])


# ---------------------------------------------------------------------------------------------
# reporting


def share(part, whole):
    return part / whole if whole else None


def pct(value):
    return "—" if value is None else f"{value:.1%}"


def summary(answers):
    wanted = sum(a["facts_wanted"] for a in answers)
    exact = [a["exact"] for a in answers if a["exact"] is not None]
    return {
        "count": len(answers),
        "recall": share(sum(a["facts_found"] for a in answers), wanted),
        "facts": wanted,
        "exact": share(sum(exact), len(exact)) if exact else None,
        "invented": share(sum(bool(a["invented"]) for a in answers), len(answers)),
        "modes": {m: share(sum(a["mode"] == m for a in answers), len(answers)) for m in MODES},
    }


def met(name, s):
    if not s["count"]:
        return "—"
    if name == "trained":
        ok = s["recall"] is not None and s["recall"] >= 0.99
    elif name == "dev":
        ok = s["recall"] is not None and s["recall"] >= 0.95 and s["invented"] <= 0.01
    else:
        ok = s["modes"]["fallback"] >= 0.90 and s["invented"] == 0
    return "met" if ok else "MISSED"


def ms(values, q):
    return f"{common.percentile(values, q) * 1000:.0f}" if values else "—"


def report(phases):
    """Print the fidelity table and the first-token table of every phase asked."""
    rows = []
    for phase, answers in phases.items():
        for name in SETS:
            s = summary([a for a in answers if a["set"] == name])
            rows.append([
                phase, name, s["count"], f"{pct(s['recall'])} ({s['facts']})" if s["facts"] else "—", pct(s["exact"]),
                pct(s["invented"]), *(pct(s["modes"][m]) for m in MODES), TARGETS[name], met(name, s),
            ])
    print()
    common.print_table(
        ["phase", "questions", "n", "key-fact recall (facts)", "exact", "invented", *MODES, "target", ""], rows
    )
    rows = []
    for phase, answers in phases.items():
        for name in SETS:
            for mode in MODES:
                chosen = [a for a in answers if a["set"] == name and a["mode"] == mode]
                if not chosen:
                    continue
                s = summary(chosen)
                firsts = [a["first_s"] for a in chosen if a["first_s"] is not None]
                rows.append([
                    phase, name, mode, s["count"], pct(s["recall"]) if s["facts"] else "—", pct(s["invented"]),
                    ms(firsts, 50), ms(firsts, 95), f"{sum(a['total_s'] for a in chosen) / len(chosen):.2f}",
                ])
    print()
    common.print_table(["phase", "questions", "mode", "n", "key-fact recall", "invented", "first token p50 ms", "p95 ms", "mean answer s"], rows)
    rows = []
    for phase, answers in phases.items():
        for name in SETS:
            fallbacks = [a for a in answers if a["set"] == name and a["mode"] == "fallback"]
            if not fallbacks:
                continue
            offered = [a for a in fallbacks if a["suggested"]]
            right = [a for a in offered if a["suggested_right"]]
            chosen = [a for a in answers if a["set"] == name]
            wanted = sum(a["facts_wanted"] for a in chosen)
            # key facts if each customer clicks the right suggestion: its curated answer (every fact)
            one_click = sum(a["facts_wanted"] if a["suggested_right"] else a["facts_found"] for a in chosen)
            rows.append([
                phase, name, len(fallbacks), len(offered), len(right) if name != "out-of-scope" else "—",
                pct(share(one_click, wanted)) if wanted else "—",
            ])
    if rows:
        print("\n\"did you mean\" (CSP_CHAT_SUGGESTIONS) with the fallback replies:")
        common.print_table(
            ["phase", "questions", "fallback replies", "offering questions", "right pair among them", "key facts within one click"], rows
        )
    others = sorted({a["mode"] for answers in phases.values() for a in answers} - set(MODES))
    if others:
        print(f"answers without a known mode in csp: {others}")
    replaced = [a for answers in phases.values() for a in answers if a["csp"].get("finish_reason") in REPLACED]
    if replaced:
        listed = ", ".join(f"{a['phase']}/{a['set']} {a['csp']['finish_reason']}" for a in replaced[:12])
        print(f"answers the fact guard replaced: {len(replaced)} ({listed}{' ...' if len(replaced) > 12 else ''})")


# ---------------------------------------------------------------------------------------------
# training


def train(staff, epochs):
    """One run with the admin action's defaults (plus --epochs), through the q2 task function."""
    from training import services, tasks
    from training.models import AdapterVersion, TrainingRun

    hyperparameters = {"epochs": epochs} if epochs else None
    run = services.training_run_start(user=staff, hyperparameters=hyperparameters, enqueue=False)
    print(
        f"training run #{run.pk}: {run.snapshot.train_count} train / {run.snapshot.dev_count} dev pairs, "
        f"hyper-parameters {run.hyperparameters}; {common.load_average()}",
        flush=True,
    )
    started = time.perf_counter()
    outcome = tasks.run_training(run.pk)
    seconds = time.perf_counter() - started
    run.refresh_from_db()
    print(f"run #{run.pk} {run.status} ({outcome}) in {seconds / 60:.1f} min wall; {common.load_average()}", flush=True)
    print("run log:\n  " + "\n  ".join(run.log.strip().splitlines()[-14:]), flush=True)
    if run.status != TrainingRun.Status.SUCCEEDED:
        raise SystemExit(f"the training run ended {run.status}: {run.error.splitlines()[0] if run.error else ''}")
    version = AdapterVersion.objects.get(run=run)
    if not version.is_active:
        services.adapter_version_activate(version=version)
        print(f"{version.name} activated by the benchmark (the run did not)")
    return seconds, run, version


def describe_version(version):
    curated, fallback = getattr(version, "curated_threshold", None), getattr(version, "fallback_threshold", None)
    print(f"active version {version.name}: thresholds curated {curated}, fallback {fallback} (None: the defaults / settings)")
    calibration = getattr(version, "calibration", None)
    if calibration:
        print("  calibration: " + json.dumps({k: v for k, v in calibration.items() if k != "rule"}, ensure_ascii=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=Path, default=Path(os.environ.get("CSP_BASE_MODEL") or common.DEFAULT_BASE),
                        help="base model directory (default: CSP_BASE_MODEL or %(default)s)")
    parser.add_argument("--data-dir", type=Path, help="CSP_DATA_DIR to use (default: a new one under /tmp, kept for --skip-train)")
    parser.add_argument("--skip-train", action="store_true",
                        help="reuse --data-dir as a previous run left it (pairs loaded, a version active): ask the trained phase only")
    parser.add_argument("--untrained-only", action="store_true", help="ask the \"no adapter yet\" phase only (no training)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the admin's default)")
    parser.add_argument("--max-pairs", type=int, help="load only the first N train pairs (a quicker run; the table is then not the issue's)")
    parser.add_argument("--without-alternates", action="store_true",
                        help="import the train pairs without their alternate questions (相似问法): the knowledge base as curated before them")
    parser.add_argument("--questions", type=int, help="ask at most N questions per set (a check of the script)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per answer (default: %(default)s)")
    args = parser.parse_args()
    args.base = args.base.resolve()
    if not (args.base / "config.json").is_file():
        raise SystemExit(f"no base model in {args.base}: run `.venv/bin/python manage.py prepare_base_model` first")
    if args.skip_train and not args.data_dir:
        raise SystemExit("--skip-train needs the --data-dir of an earlier run")

    print(f"fidelity.py {' '.join(sys.argv[1:])}")
    print(common.cpu_line())
    print(f"base {args.base}; {common.load_average()}", flush=True)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="csp-fidelity-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    setup_django(data_dir, args.base)

    from training.models import AdapterVersion

    phases = {}
    if args.skip_train:
        version = AdapterVersion.objects.filter(is_active=True).first()
        if version is None:
            raise SystemExit(f"{data_dir} has no active version to ask")
        describe_version(version)
        phases["trained"] = run_phase("trained", question_sets(args.questions), args, data_dir)
    else:
        staff, _key = prepare(data_dir, args.max_pairs, alternates=not args.without_alternates)
        sets = question_sets(args.questions)
        print("questions: " + ", ".join(f"{name} {len(items)}" for name, items in sets.items()), flush=True)
        phases["no adapter yet"] = run_phase("no adapter yet", sets, args, data_dir)
        if args.untrained_only:
            report(phases)
            print(f"\ndata dir: {data_dir}")
            return
        report(phases)
        seconds, run, version = train(staff, args.epochs)
        describe_version(version)
        phases["trained"] = run_phase("trained", sets, args, data_dir)
        print(f"\ntraining: run #{run.pk}, {run.hyperparameters.get('epochs')} epochs, {run.step} steps, {seconds / 60:.1f} min wall")
    report(phases)
    print(f"\ndata dir kept for --skip-train: {data_dir}")
    print(f"after: {common.load_average()}")


if __name__ == "__main__":
    main()
