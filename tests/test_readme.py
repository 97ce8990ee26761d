"""The README's runnable code blocks run as written.

Marking a block: put a comment line right before its fence,

    <!-- test -->          the block runs in every test run
    <!-- test: data -->    the block needs the real data sets; it runs only with
                           CONVTRAIN_TEST_DATA set (else it is skipped)

and fence it as ```python or ```bash. Unmarked blocks (the set-up, `convtrain ui`, a sweep on
several machines, TOML) are shown, not run.

How they run: the marked blocks, in the README's order, in one fresh folder that holds a copy
of experiments/ and, with CONVTRAIN_TEST_DATA set, `data` pointing at the real data sets (the
layout the experiments' data_path expects), as a reader working in a clone would run them.
- a python block runs as `python -c <block>` in that folder;
- a bash block runs line by line (a trailing backslash continues a line, `#` starts a comment);
  every command must be `convtrain ...`, run as `python -m convtrain.cli ...` with this tree
  first on PYTHONPATH, so the tree under test is the one that runs whether or not it is
  installed.
Any non-zero exit fails the test, naming the README line of the block and the command.
The plain blocks are kept small (digits, a few epochs), so this file takes well under a minute
on 2 cores; the data blocks add a few seconds each.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 450
COMMAND_TIMEOUT = 300

MARKER = re.compile(r"^<!--\s*test(?::\s*(?P<kind>[\w-]+))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
KINDS = {None, "data"}
LANGUAGES = {"python", "bash"}


@dataclass
class Block:
    line: int          # the README line of the opening fence
    lang: str
    kind: str | None   # None, or "data"
    code: str


def marked_blocks(text: str) -> list[Block]:
    """Every fenced block whose fence follows a `<!-- test -->` line, in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        marker = MARKER.match(lines[i])
        if marker is None:
            i += 1
            continue
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        assert fence, f"README.md:{i + 1}: a test marker must be followed directly by a ``` fence"
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{i + 2}: the block is never closed"
        blocks.append(Block(line=i + 2, lang=fence["lang"], kind=marker["kind"],
                            code="\n".join(lines[i + 2:end]) + "\n"))
        i = end + 1
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """A bash block's commands as argument lists: continuations joined, comments and blank lines out."""
    commands, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            commands.append(words)
    return commands


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)   # every block uses the folder's own mlflow.db
    env.pop("CONVTRAIN_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "100"
    return env


def _run(argv: list[str], cwd: Path, where: str) -> None:
    try:
        done = subprocess.run(argv, cwd=cwd, env=_environment(), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: still running after {COMMAND_TIMEOUT} s")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        pytest.fail(f"{where}: exit code {done.returncode}\n{tail}")


def run_block(block: Block, cwd: Path) -> None:
    if block.lang == "python":
        _run([sys.executable, "-c", block.code], cwd, f"README.md:{block.line} (python block)")
        return
    for words in shell_commands(block.code):
        where = f"README.md:{block.line}: {shlex.join(words)}"
        assert words[0] == "convtrain", f"{where}: a tested bash block may only run convtrain commands"
        _run([sys.executable, "-m", "convtrain.cli", *words[1:]], cwd, where)


def reader_folder(tmp_path: Path, data: Path | None) -> Path:
    """A fresh working folder as a reader in a clone has it: experiments/ (and data/, if given)."""
    shutil.copytree(ROOT / "experiments", tmp_path / "experiments")
    if data is not None:
        (tmp_path / "data").symlink_to(data, target_is_directory=True)
    return tmp_path


BLOCKS = marked_blocks(README.read_text(encoding="utf-8"))


def test_readme_is_a_guide_with_marked_blocks():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    assert any(b.kind is None for b in BLOCKS) and any(b.kind == "data" for b in BLOCKS)
    for block in BLOCKS:
        assert block.lang in LANGUAGES, f"README.md:{block.line}: cannot run a {block.lang!r} block"
        assert block.kind in KINDS, f"README.md:{block.line}: unknown marker kind {block.kind!r}"


def test_readme_blocks_run_in_order(tmp_path):
    folder = reader_folder(tmp_path, None)
    for block in BLOCKS:
        if block.kind is None:
            run_block(block, folder)


def test_readme_data_blocks_run(tmp_path, test_data_dir):
    folder = reader_folder(tmp_path, test_data_dir)
    for block in BLOCKS:
        if block.kind == "data":
            run_block(block, folder)


def test_a_broken_block_fails(tmp_path):
    """The runner itself: a command that fails, and python that raises, fail the test."""
    folder = reader_folder(tmp_path, None)
    for block in (Block(1, "bash", None, "convtrain fit --epochs 0\n"),
                  Block(2, "python", None, "from convtrain import kernels\n")):
        with pytest.raises(pytest.fail.Exception, match=f"README.md:{block.line}"):
            run_block(block, folder)
