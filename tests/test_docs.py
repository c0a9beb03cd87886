"""The documentation says what the code does.

- docs/reference.md's CLI and config-key sections equal what scripts/cli_reference.py generates.
- Every ```bash block of README.md and docs/*.md is run as written, in one scratch directory and
  in that order (README first, so the guides find its shards, tokenizer and codes), unless the
  line right before it says `<!-- not run: REASON -->` (a cluster, S3, GPUs, minutes of work).
  Training is such a block, so a tiny untrained tokenizer stands in at runs/fm/final.
- Every `vqtok` command in any block, run or not, names a real subcommand and real options.
- Every relative link between the pages points at a file and heading that exist.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import cli_reference  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")

# commands per page: (run, not run). A block that vanishes or changes kind fails here; after
# adding or removing one on purpose, update the count.
EXPECTED_COMMANDS = {
    "README.md": (6, 4),
    "docs/benchmarks.md": (0, 0),
    "docs/design.md": (0, 0),
    "docs/downstream.md": (4, 3),
    "docs/prepare.md": (3, 2),
    "docs/reference.md": (0, 0),
    "docs/tokenize.md": (3, 2),
    "docs/training.md": (0, 5),
}


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    not_run: str | None

    def commands(self) -> list[str]:
        """Logical command lines: continuations joined, blank and comment lines dropped."""
        joined = re.sub(r"\\\n", " ", self.text)
        return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def blocks(page: Path) -> list[Block]:
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        marker = NOT_RUN.match(lines[i - 1]) if i else None
        found.append(Block(str(page.relative_to(ROOT)), i + 1, fence.group(1),
                           "\n".join(lines[i + 1:end]) + "\n", marker.group(1) if marker else None))
        i = end + 1
    return found


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
BASH_BLOCKS = [b for b in ALL_BLOCKS if b.lang == "bash"]


# ---------------------------------------------------------------- the generated reference

def test_reference_is_generated_from_the_code():
    text = cli_reference.REFERENCE.read_text()
    assert cli_reference.generated(text) == text, (
        f"docs/reference.md differs from the CLI or config code: run `{cli_reference.REGENERATE}` "
        "and commit the result")


# ---------------------------------------------------------------- commands name real options

def vqtok_commands(command_line: str) -> list[list[str]]:
    """The argument lists of the `vqtok` commands in one shell line (also inside `bash -c '...'`)."""
    found, current = [], None
    for token in shlex.split(command_line, comments=True):
        if token in (";", "&&", "||", "|"):
            current = None
        elif token == "vqtok":
            current = []
            found.append(current)
        elif current is not None:
            current.append(token)
        elif "vqtok " in token:
            found += vqtok_commands(token)
    return found


def check_vqtok_args(args: list[str]) -> None:
    """Resolve the subcommand and check every option name; where no value is a shell variable or
    a placeholder, let click parse the whole command (types, required options)."""
    from pipelines.cli import main
    ctx = click.Context(main, info_name="vqtok")
    cmd, rest = main, list(args)
    while isinstance(cmd, click.Group):
        assert rest, f"vqtok {' '.join(args)}: no subcommand"
        name = rest.pop(0)
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"vqtok {' '.join(args)}: no subcommand {name!r}"
        cmd, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    nested = []
    if "--" in rest:
        rest, nested = rest[:rest.index("--")], rest[rest.index("--") + 1:]
    known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
    for token in rest:
        if token.startswith("-") and token != "-":
            assert token.split("=")[0] in known, f"vqtok {' '.join(args)}: {cmd.name} has no option {token}"
    if not any("$" in t or "..." in t for t in rest):
        try:
            cmd.make_context(ctx.info_name, list(rest), parent=ctx.parent)
        except click.exceptions.Exit:
            pass
        except click.ClickException as e:
            pytest.fail(f"vqtok {' '.join(args)}: {e.format_message()}")
    if nested:
        check_vqtok_args(nested)


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=lambda b: f"{b.page}:{b.line}")
def test_commands_name_real_subcommands_and_options(block):
    for line in block.commands():
        for args in vqtok_commands(line):
            check_vqtok_args(args)


def test_commands_are_in_bash_blocks():
    """A command shown in an untagged block would escape the checks above."""
    for block in ALL_BLOCKS:
        if block.lang != "bash":
            hidden = [line for line in block.text.splitlines() if re.match(r"\s*(\$ )?vqtok ", line)]
            assert not hidden, f"{block.page}:{block.line}: a command outside a ```bash block: {hidden[0]}"


def test_command_counts_per_page():
    counts = {}
    for page in PAGES:
        name = str(page.relative_to(ROOT))
        mine = [b for b in BASH_BLOCKS if b.page == name]
        counts[name] = (sum(len(b.commands()) for b in mine if b.not_run is None),
                        sum(len(b.commands()) for b in mine if b.not_run is not None))
    assert counts == EXPECTED_COMMANDS, "a documented command appeared or vanished (update EXPECTED_COMMANDS on purpose)"


# ---------------------------------------------------------------- links

def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_links_between_pages_resolve():
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to a missing file {target}"
            if anchor:
                assert anchor in anchors(file), f"{page.relative_to(ROOT)}: no heading for {target}"


# ---------------------------------------------------------------- the commands run

def make_workspace(root: Path) -> dict:
    """A scratch directory with the repo's configs and examples, `vqtok` and `python` on PATH
    running this checkout, a few photographs for `vqtok prepare folder`, and a tiny tokenizer
    where the (not run) training block would have exported one."""
    import numpy as np
    from PIL import Image

    from tokenizer import VQVAE, VQVAEConfig

    for name in ("configs", "examples", "scripts"):
        (root / name).symlink_to(ROOT / name)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, run in (("vqtok", f'"{sys.executable}" -m pipelines'), ("python", f'"{sys.executable}"')):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {run} "$@"\n')
        (bin_dir / name).chmod(0o755)

    photos = root / "my_photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(80, 96), (64, 120), (72, 72)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(photos / f"photo{i}.png")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")

    config = VQVAEConfig(in_channels=1, resolution=28, hidden=16, res_hidden=8, num_res_blocks=0,
                         code_dim=8, quantizer={"codebook_size": 64, "kmeans_init": False})
    VQVAE(config).save_pretrained(str(root / "runs" / "fm" / "final"))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
               HOME=str(root / "home"), RAY_USAGE_STATS_ENABLED="0")
    return env


def test_documented_commands_run_as_written(tmp_path):
    env = make_workspace(tmp_path)
    ran = 0
    for block in BASH_BLOCKS:
        if block.not_run is not None:
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (f"{block.page}:{block.line} failed (exit {proc.returncode}):\n"
                                      f"{block.text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        ran += len(block.commands())
    assert ran == sum(run for run, _ in EXPECTED_COMMANDS.values())
    assert (tmp_path / "codes" / "fm" / "_SUCCESS").exists()
    assert list((tmp_path / "data" / "photo-crops").glob("holdout-*.tar"))
