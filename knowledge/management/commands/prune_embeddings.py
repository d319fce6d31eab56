"""Delete cached embeddings that no approved or draft pair needs any more: the old texts of
edited pairs, archived and deleted pairs' texts, and every vector an older embedder made.

    python manage.py prune_embeddings --dry-run   # count only
    python manage.py prune_embeddings
"""

from django.core.management.base import BaseCommand

from knowledge.retrieval import prune_embeddings


class Command(BaseCommand):
    help = "Delete cached embeddings (knowledge.Embedding) that no approved or draft pair's current texts need."

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Count what would be deleted; delete nothing.")

    def handle(self, *args, dry_run, **options):
        pruned = prune_embeddings(dry_run=dry_run)
        stale = f"{pruned.stale} stale ({pruned.other_embedders} made by another embedder)"
        if dry_run:
            self.stdout.write(f"{pruned.needed} vectors needed; {stale} would be deleted (dry run).")
        else:
            self.stdout.write(self.style.SUCCESS(f"{pruned.needed} vectors needed; {stale}: {pruned.deleted} deleted."))
