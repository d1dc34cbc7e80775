"""Save an SVG screenshot of each dashboard view: ``python -m tui.screenshots RUN --out DIR``.

For the README and for reviewing a run away from its terminal. It drives the real app headless
(Textual's ``run_test``) at a chosen terminal size, so what is saved is what a person sees.
``--demo`` first writes the demo run of :mod:`tui.demo` into ``RUN`` (which must not exist).

Files: ``health.svg``, ``curves.svg``, ``diagnostics.svg``, ``trajectories.svg``,
``trajectory.svg`` (one opened: a reward/strict disagreement if there is one, else the first),
``evaluation.svg``, ``help.svg``.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tui.app import Dashboard
from tui.demo import write_demo_run

#: (file stem, keys pressed from the previous view). ``escape`` leaves the open trajectory.
VIEWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("health", ("1",)),
    ("curves", ("2",)),
    ("diagnostics", ("3",)),
    ("trajectories", ("4",)),
    ("trajectory", ()),  # opened by open_trajectory(), see below
    ("evaluation", ("escape", "5")),
    ("help", ("question_mark",)),
)


async def save_screenshots(
    run_dir: str | Path, out_dir: str | Path, size: tuple[int, int] = (160, 48)
) -> list[Path]:
    """Drive the app over ``run_dir`` and save one SVG per view in ``out_dir``; returns paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = Dashboard(run_dir, poll_s=0.5)
    saved: list[Path] = []
    async with app.run_test(size=size) as pilot:
        for _ in range(100):  # the first read of the store, off the UI thread
            await pilot.pause(0.1)
            if app.snapshot is not None or app.problem is not None:
                break
        await pilot.pause(0.3)
        for stem, keys in VIEWS:
            if keys:
                await pilot.press(*keys)
            if stem == "trajectory":
                # The most telling one: a reward/strict disagreement, from any step.
                found = app.with_store(lambda s: s.trajectories(filter="disagree", limit=1))
                candidates = found or app.browser.records
                if candidates:
                    app.browser.open_trajectory(candidates[0].id)
            await pilot.pause(0.6)
            saved.append(Path(app.save_screenshot(f"{stem}.svg", str(out))))
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tui.screenshots", description=__doc__)
    parser.add_argument("run_dir", help="a run directory (with run.sqlite)")
    parser.add_argument("--out", default="docs/screenshots", help="where the SVGs go")
    parser.add_argument("--size", default="160x48", help="terminal COLUMNSxROWS (e.g. 80x24)")
    parser.add_argument("--demo", action="store_true", help="write the demo run into run_dir first")
    args = parser.parse_args(argv)
    cols, rows = (int(x) for x in args.size.lower().split("x"))
    if args.demo:
        write_demo_run(args.run_dir).close()
    for path in asyncio.run(save_screenshots(args.run_dir, args.out, (cols, rows))):
        print(path)  # a script's output (the library itself never prints)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
