"""Where a page's time goes: milliseconds and Python function calls per page, and a profile.

Builds a throwaway cluster with the demo data set (``--scale``, 50 seats), logs in as an
agent through the real form, then, in-process through the Flask test client, times each
page of the mix and profiles them all with cProfile. The function-call count is the
steady figure on a noisy host: compare it before and after a change, with the milliseconds.

    .venv/bin/python bench/page_profile.py [--scale 0.1] [--repeat 40] [--top 40] [--sort tottime] [--page /accounts/]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import pstats
import re
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import config, demo_data, seats  # noqa: E402
from appliance.db import migrate, open_database  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.pgcluster import start_cluster  # noqa: E402

PASSWORD = "bench password 123"
AGENT = "seat0010@demo.invalid"  # seats 2-6 are managers, from 7 on agents


class GcClock:
    """The time Python's cyclic garbage collector takes, from its start and stop callbacks."""

    def __init__(self):
        self.seconds, self.collections, self.by_generation, self._started = 0.0, 0, [0, 0, 0], None
        gc.callbacks.append(self._callback)

    def reset(self) -> None:
        """Start the time over (the counts run on)."""
        self.seconds = 0.0

    def _callback(self, phase, info) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1
            self.by_generation[info["generation"]] += 1
            self._started = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.1, help="demo data scale [0.1]")
    parser.add_argument("--repeat", type=int, default=40, help="requests per page timed [40]")
    parser.add_argument("--top", type=int, default=40, help="profile lines shown [40]")
    parser.add_argument("--sort", default="cumulative", help="profile order: cumulative, tottime, ncalls [cumulative]")
    parser.add_argument("--page", action="append", default=[], metavar="PATH",
                        help="profile only these pages (repeatable; {account} is an account's id)")
    args = parser.parse_args()

    cluster = start_cluster()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="crm-bench-pages-"))
        config.write_secret(tmp / "db-password", cluster.create_app_database("crm_test", "crm"))
        config.write_secret(tmp / "secret-key", secrets.token_urlsafe(48))
        settings = make_settings(cluster, tmp)
        settings = dataclasses.replace(settings, web=dataclasses.replace(settings.web, page_size=50))
        db = open_database(settings)
        migrate(db)
        demo_data.generate(settings, seats=50, scale=args.scale, seed=1, password_hash=seats.hash_password(PASSWORD))
        from webapp import create_app

        client = create_app(settings, database=db).test_client()
        form = client.get("/auth/login").get_data(as_text=True)
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', form).group(1)
        assert client.post("/auth/login", data={"email": AGENT, "password": PASSWORD,
                                                "csrf_token": token}).status_code == 302
        account = re.search(r'href="/accounts/(\d+)"', client.get("/accounts/").get_data(as_text=True)).group(1)
        pages = ["/", "/accounts/", "/accounts/{account}", "/contacts/?q=王", "/opportunities/", "/search/?q=华信"]
        pages = [page.format(account=account) for page in (args.page or pages)]
        print(f"{'page':32} {'ms':>7} {'calls':>9} {'gc ms':>7}")
        gc_clock = GcClock()
        for path in pages:
            for _ in range(3):
                client.get(path)  # warm: templates compiled, pool connected
            gc_clock.reset()
            started = time.perf_counter()
            for _ in range(args.repeat):
                client.get(path)
            ms = 1000 * (time.perf_counter() - started) / args.repeat
            gc_ms = gc_clock.seconds * 1000 / args.repeat
            profile = cProfile.Profile()
            profile.runcall(client.get, path)
            calls = pstats.Stats(profile).total_calls
            print(f"{path:32} {ms:7.1f} {calls:9,} {gc_ms:7.2f}")
        print(f"gc over the whole run: {gc_clock.collections} collections, by generation {gc_clock.by_generation};"
              f" thresholds {gc.get_threshold()}")
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(10):
            for path in pages:
                client.get(path)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
        db.close_all()
    finally:
        cluster.stop_and_remove()


if __name__ == "__main__":
    main()
