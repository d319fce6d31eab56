"""Q&A list latency with 10 000 pairs: p50 / p95 of `GET /api/v1/qa-pairs/` at several page sizes.

    .venv/bin/python benchmarks/api_list.py              # 10 000 pairs, 50 requests per case

A throwaway SQLite database in a temporary folder (the real one is not touched), the staff API
through Django's test client (in-process: the view, serializer and database, no network).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="csp-bench-api-")
    os.environ.update({"CSP_DATA_DIR": folder, "DATABASE_URL": f"sqlite:///{folder}/db.sqlite3", "CSP_API_THROTTLE_USER": "1000000/min"})
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "csplatform.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from rest_framework.test import APIClient

    from knowledge.models import QAPair

    call_command("migrate", verbosity=0)
    QAPair.objects.bulk_create(
        (QAPair(instruction=f"用户问：第{n}号问题怎么办？", output="请在7天内联系客服。" * 5, status="approved", question_hash=f"{n:064x}")
         for n in range(args.pairs)),
        batch_size=2000,
    )
    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_superuser("bench", "bench@example.com", "x" * 20))

    print(f"{args.pairs} pairs, {args.requests} requests per case (in-process, SQLite)")
    print(f"{'query':<38} {'p50 ms':>8} {'p95 ms':>8} {'rows':>5}")
    for query in ({"page_size": 50}, {"page_size": 200}, {"page_size": 200, "page": 50}, {"page_size": 50, "search": "第999"},
                  {"page_size": 100000}):
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get("/api/v1/qa-pairs/", query)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
        times.sort()
        p95 = times[max(0, round(0.95 * len(times)) - 1)]
        label = "&".join(f"{k}={v}" for k, v in query.items())
        print(f"{label:<38} {statistics.median(times):8.1f} {p95:8.1f} {len(response.json()['results']):5d}")


if __name__ == "__main__":
    main()
