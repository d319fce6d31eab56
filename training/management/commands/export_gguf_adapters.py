"""Write the llama.cpp LoRA (`adapter.gguf`) of adapter versions that lack one.

    python manage.py export_gguf_adapters                # every version without adapter.gguf
    python manage.py export_gguf_adapters v3 v5          # only these versions
    python manage.py export_gguf_adapters --force        # rewrite those that have one too

Training runs write the file themselves; this is for versions trained before that, or whose
export failed (the run's log says why). One line per version; running it twice changes nothing.
On a terminal a bar counts the versions done (`-v 0` hides it). Exits non-zero when a version
could not be exported.
"""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.utils.translation import gettext as _

from csplatform.progress import Progress
from llm import gguf as gguf_export
from training.models import AdapterVersion


class Command(BaseCommand):
    help = "Write the llama.cpp GGUF LoRA file (adapter.gguf) of every adapter version that lacks one."

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="VERSION", help="Only these versions, e.g. v3 (default: all).")
        parser.add_argument("--force", action="store_true", help="Rewrite the file where it exists already.")

    def handle(self, *args, names, force=False, **options):
        versions = AdapterVersion.objects.select_related("base_model").order_by("created_at", "pk")
        if names:
            versions = versions.filter(name__in=names)
            unknown = sorted(set(names) - {version.name for version in versions})
            if unknown:
                raise CommandError(_("No adapter version named %(names)s.") % {"names": ", ".join(unknown)})
        failed = 0
        # Drawn after every version (mininterval 0): each takes seconds, and there are few.
        bar = Progress(
            self.stdout, options["verbosity"], versions, total=len(versions), desc=_("Adapters"), unit=_("adapter"), mininterval=0
        )
        for version in bar:
            bar.set_postfix_str(version.name)
            target = Path(version.path) / gguf_export.LORA_FILENAME
            if target.is_file() and not force:
                with bar.above():
                    self.stdout.write(_("%(name)s: %(path)s exists, skipped") % {"name": version.name, "path": target})
                continue
            try:
                path = gguf_export.write_lora_gguf(version.path, base_dir=version.base_model.path)
            except (OSError, ValueError) as exc:
                failed += 1
                with bar.above():
                    self.stderr.write(_("%(name)s: failed: %(error)s") % {"name": version.name, "error": exc})
                continue
            with bar.above():
                self.stdout.write(
                    self.style.SUCCESS(
                        _("%(name)s: wrote %(path)s (%(size).1f MB)")
                        % {"name": version.name, "path": path, "size": path.stat().st_size / 1e6}
                    )
                )
        if failed:
            raise CommandError(_("%(count)d adapter version(s) could not be exported.") % {"count": failed})
