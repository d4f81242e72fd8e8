"""The ``mmcourse`` command: list, run, refresh and check the course, build its site.

mmcourse list                          chapters, their parameters and defaults
mmcourse run 01 [02 ...|--all] [-p name value]... [--output DIR]
mmcourse refresh [01 ...|--all] [--from py|ipynb]   re-execute notebooks in place
mmcourse doctor                        versions, device, model and data hashes, espeak-ng
mmcourse site [--output DIR]           the course as a static HTML book (stored outputs)

``mmcourse run`` never loses earlier work in its output folder: each chapter's results are
merged into the existing ``results.json`` (atomically), an executed notebook replaces the
previous one only when its run succeeds (a failed one is kept as ``NN_slug.failed.ipynb``),
and the folder is locked while a run writes there (a second run is refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from mmcourse import chapters as ch
from mmcourse import results as res


def _select(keys: list[str], all_: bool) -> list[ch.Chapter]:
    if all_ and keys:
        raise ch.ChapterError("give chapter names or --all, not both")
    if all_:
        return ch.list_chapters()
    if not keys:
        raise ch.ChapterError("name at least one chapter (e.g. `mmcourse run 01`) or use --all")
    return [ch.find_chapter(k) for k in keys]


def cmd_list(args: argparse.Namespace) -> int:
    for chapter in ch.list_chapters():
        print(f"{chapter.name}  -  {chapter.title}")
        for name, spec in ch.chapter_parameters(chapter).items():
            note = f"  # {spec['help']}" if spec["help"] else ""
            print(f"    {name} = {spec['default']!r} ({spec['type']}){note}")
    return 0


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def cmd_run(args: argparse.Namespace) -> int:
    import papermill

    selected = _select(args.chapters, args.all)
    texts = dict(args.parameter)  # name -> the text typed; parsed per chapter, by its type
    # Check every parameter before running anything: a typo should not cost a long run.
    if len(selected) > 1:
        known = set().union(*(ch.chapter_parameters(c) for c in selected))
        unknown = sorted(set(texts) - known)
        if unknown:
            raise ch.ChapterError(f"no selected chapter has parameter(s): {', '.join(unknown)}")
    strict = len(selected) == 1
    params_of = {c.name: ch.parse_parameters(c, texts, strict=strict) for c in selected}
    results_path = Path(args.output).expanduser() / "results.json"
    failed = []
    with ch.lock_output(args.output) as output:
        try:
            res.load_results_file(results_path)  # ours to merge into, or refuse now
        except ValueError as err:
            raise ch.ChapterError(str(err)) from None
        for chapter in selected:
            start = time.perf_counter()
            params = params_of[chapter.name]
            shown = " ".join(f"{k}={v!r}" for k, v in params.items())
            print(f"== {chapter.name} {shown}".rstrip(), flush=True)
            try:
                results = ch.run_chapter_locked(chapter, output, params, progress_bar=args.progress)
            except papermill.PapermillExecutionError as err:
                failed.append(chapter.name)
                print(f"   FAILED in cell {err.exec_count}: {err.ename}: {err.evalue}")
                print(f"   see {ch.failed_notebook_path(chapter, output)}")
                kept = output / chapter.path.name
                if kept.exists():
                    print(f"   (the previous {kept.name} and its results were kept)")
                continue
            res.merge_results_file(results_path, chapter.name, results)
            for name, value in results.items():
                print(f"   {name} = {_show(value)}")
            print(f"   ({time.perf_counter() - start:.1f} s)")
    print(f"results merged into {results_path}")
    if failed:
        print(f"{len(failed)} chapter(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    for chapter in _select(args.chapters, args.all):
        start = time.perf_counter()
        source = ch.refresh_chapter(chapter, source=args.source)
        print(f"refreshed {chapter.name} from its {source} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import importlib.metadata as md
    import platform

    import torch

    from mmcourse.pretrained import (
        ModelFileError,
        default_language_model_path,
        default_model_path,
        verify_language_model_file,
        verify_model_files,
    )
    from mmcourse.utils import get_device

    ok = True
    print(f"python        {platform.python_version()} ({sys.executable})")
    for package in (
        "mmcourse",
        "torch",
        "transformers",
        "datasets",
        "peft",
        "accelerate",
        "sacrebleu",
        "gguf",
        "papermill",
        "jupyterlab",
        "numpy",
    ):
        try:
            print(f"{package:<13} {md.version(package)}")
        except md.PackageNotFoundError:
            print(f"{package:<13} MISSING")
            ok = False
    print(f"device        auto -> {get_device('auto')} (cuda: {torch.cuda.is_available()})")
    try:
        path = default_model_path()
        verified = verify_model_files(path)
        print(f"text encoder  OK, SHA-256 verified: {', '.join(verified)} ({path})")
    except ModelFileError as err:
        print(f"text encoder  PROBLEM: {err}")
        ok = False
    try:
        gguf = default_language_model_path()
        verify_language_model_file(gguf)
        print(f"language model OK, SHA-256 verified ({gguf})")
    except ModelFileError as err:
        print(f"language model PROBLEM: {err}")
        ok = False
    espeak = shutil.which("espeak-ng")
    if espeak:
        version = subprocess.run(
            [espeak, "--version"], capture_output=True, text=True
        ).stdout.strip()
        print(f"espeak-ng     {version}")
    else:
        print("espeak-ng     not found (only needed to re-render the spoken digits)")
    try:
        from mmcourse.data.avdigits import load_spoken_digits

        spoken = load_spoken_digits(verify=True)
        print(
            f"spoken digits OK, SHA-256 verified, {len(spoken.digits)} clips at "
            f"{spoken.sample_rate} Hz"
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"spoken digits PROBLEM: {err}")
        ok = False
    try:
        print(f"notebooks     {len(ch.list_chapters())} chapters in {ch.notebooks_dir()}")
    except ch.ChapterError as err:
        print(f"notebooks     {err}")
    print("all good" if ok else "some checks failed")
    return 0 if ok else 1


def cmd_site(args: argparse.Namespace) -> int:
    from mmcourse import site

    try:
        folder = site.build_site(args.output, repo_url=args.repo_url, branch=args.branch)
    except site.SiteError as err:
        print(f"mmcourse site: error: {err}", file=sys.stderr)
        return 2
    print(f"site written to {folder}; open {folder / 'index.html'} in a browser")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmcourse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="chapters, their parameters and defaults").set_defaults(
        func=cmd_list
    )
    run = sub.add_parser("run", help="execute chapters headless with papermill")
    run.add_argument("chapters", nargs="*", help="chapter numbers or names, e.g. 01 02")
    run.add_argument("--all", action="store_true", help="run every chapter")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="set a parameter (repeatable), e.g. -p seed 1; read as the parameter's type",
    )
    run.add_argument(
        "--output",
        "-o",
        default="mmcourse-runs",
        help="folder for executed notebooks and results.json (merged into, never emptied)",
    )
    run.add_argument("--progress", action="store_true", help="show papermill's cell progress bar")
    run.set_defaults(func=cmd_run)
    refresh = sub.add_parser("refresh", help="re-execute notebooks in place")
    refresh.add_argument("chapters", nargs="*")
    refresh.add_argument("--all", action="store_true")
    refresh.add_argument(
        "--from",
        dest="source",
        choices=("py", "ipynb"),
        default=None,
        help="take the cells from this file when both the .py and the .ipynb were edited",
    )
    refresh.set_defaults(func=cmd_refresh)
    sub.add_parser("doctor", help="check the environment").set_defaults(func=cmd_doctor)
    site = sub.add_parser("site", help="build the course as a static HTML book (no execution)")
    site.add_argument(
        "--output",
        "-o",
        default="mmcourse-site",
        help="folder for the site: new, empty, or an earlier `mmcourse site` build",
    )
    site.add_argument(
        "--repo-url",
        default=None,
        help="https://github.com/OWNER/NAME for the Colab links (default: $GITHUB_REPOSITORY "
        "or the origin remote)",
    )
    site.add_argument("--branch", default="main", help="the branch the Colab links open")
    site.set_defaults(func=cmd_site)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ch.ChapterError as err:
        print(f"mmcourse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"mmcourse {args.command}: interrupted; files of earlier runs were kept",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
