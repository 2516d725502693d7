"""The repository stands alone on a user's machine: no file refers to a path outside it (the
development machine's folders, a `shared/` folder beside the clone), no development history sits
in it, and the source runs on every Python that `setup.py` admits (checked statically by vermin,
since only one Python is installed where the tests run)."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "runs", ".jax_cache"}
TEXT_SUFFIXES = (".py", ".md", ".sh", ".txt", ".ini", ".cfg", ".toml", ".json", ".jsonl", "")
PYTHON_DIRS = ["svg_jax", "launch", "bench", "configs", "tests", "research"]

# Paths that exist only on the machine the project was developed on, or beside its clone there.
OUTSIDE = re.compile(r"/work/|\.\./shared|shared/assets|shared/docs|/root/|/home/\w")
# Words of development history: numbered work periods, experiment dates, scratch workdirs.
HISTORY = re.compile(r"\bsessions? \d|\bwork periods?\b|\b20\d\d-\d\d-\d\d\b|/tmp/|\"/tmp\b")


def _text_files():
  for root, dirs, files in os.walk(REPO):
    dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
    for name in files:
      path = os.path.join(root, name)
      if os.path.splitext(name)[1] in TEXT_SUFFIXES and os.path.getsize(path) < 2_000_000:
        try:
          with open(path, encoding="utf-8") as f:
            yield os.path.relpath(path, REPO), f.read()
        except UnicodeDecodeError:
          continue


def _hits(pattern, allowed_files=()):
  out = []
  for rel, text in _text_files():
    if rel in allowed_files:
      continue
    for n, line in enumerate(text.splitlines(), 1):
      if pattern.search(line):
        out.append(f"{rel}:{n}: {line.strip()[:120]}")
  return out


def test_no_file_refers_to_a_path_outside_the_repo():
  hits = _hits(OUTSIDE, allowed_files={"tests/test_repo_hygiene.py"})
  assert not hits, "paths outside the repository:\n" + "\n".join(hits)


def test_no_development_history_in_the_repo():
  hits = _hits(HISTORY, allowed_files={"tests/test_repo_hygiene.py"})
  assert not hits, "development history:\n" + "\n".join(hits)


def test_the_patterns_catch_what_they_are_for():
  """Guards against a check that cannot fail: each pattern matches the kind of line it exists
  to stop (these are the lines that once stood in the repo) and passes ordinary text."""
  for line in ('ASSETS = "/work/shared/assets/svg_t2i"', 'PROMPTS = "../shared/assets/prompts"'):
    assert OUTSIDE.search(line)
  for line in ("as sessions 1-7 wrote it", "measured 2026-11-26", "--workdir /tmp/s8/demo_wc",
               'c.data.demo_dir = "/tmp"'):
    assert HISTORY.search(line)
  for line in ("tests/assets/man.jpg", "a shared mesh", "runs/demo/eval", "each session of t"):
    assert not OUTSIDE.search(line) and not HISTORY.search(line)


# The top level the README and docs/design.md describe; anything else at the top is a stray.
TOP_LEVEL = {".ci", ".gitignore", "LICENSE", "NOTICE", "README.md", "bench", "configs",
             "constraints.txt", "docs", "launch", "pytest.ini", "research", "setup.py", "svg_jax",
             "tests"}
# Leftovers of a shell or an editor: logs, nohup output, merge and backup files.
STRAY = re.compile(r"(\.(log|orig|rej|swp|bak|pyc)|~|(^|/)nohup\.out)$")


def _repository_files():
  """The files a clone holds: git's list where this is a checkout, else the tree on disk."""
  if os.path.isdir(os.path.join(REPO, ".git")):
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.splitlines()
  return [rel for rel, _ in _text_files()]


def test_no_stray_files_in_the_repo():
  files = _repository_files()
  assert files
  strays = {f.split("/")[0] for f in files} - TOP_LEVEL
  strays |= {f for f in files if STRAY.search(f)}
  assert not strays, "files that are no part of the project: " + ", ".join(sorted(strays))
  for name in ("term2.log", "nohup.out", "svg_jax/train/loop.py.orig", "notes.md~"):
    assert STRAY.search(name) or name.split("/")[0] not in TOP_LEVEL


def _vermin(*paths):
  return subprocess.run([sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
                         "--target=3.10-", "--violations",
                         "--eval-annotations", "--no-tips", *paths],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_source_runs_on_python_3_10():
  """vermin computes the minimum Python of every file; any construct newer than 3.10 (a 3.11
  module, syntax or stdlib function) is a violation and a non-zero exit."""
  out = _vermin(*[d for d in PYTHON_DIRS if os.path.isdir(os.path.join(REPO, d))])
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


@pytest.mark.parametrize("code", ["import tomllib\n", "try:\n  pass\nexcept* ValueError:\n  pass\n",
                                  "from typing import Self\n"])
def test_vermin_rejects_3_11_only_code(tmp_path, code):
  path = tmp_path / "newer.py"
  path.write_text(code)
  out = _vermin(str(path))
  assert out.returncode != 0, out.stdout
