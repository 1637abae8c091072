"""The documentation as users read it: README.md and docs/*.md.

* every `zfdiffusion ...` command line in their code blocks parses with the real parser
  (cli.build_parser()); a failure names the file and line;
* every relative link and image (and every #anchor they name) exists;
* the cheapest documented commands run, in the order the README gives them, shrunk to tiny sizes
  and few steps, with the bundled models, in a temporary folder.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from napari_zfdiffusion import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The README's images are absolute addresses (PyPI and the napari hub show no relative ones): those
# of this repository's main branch must name a file of this checkout.
REPO_RAW = re.compile(r"^https://raw\.githubusercontent\.com/zfdiffusion/napari-zfdiffusion/main/(.+)$")
REPO_BLOB = re.compile(r"^https://github\.com/zfdiffusion/napari-zfdiffusion/(?:blob|tree)/main/(.+)$")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------ code blocks and their commands
def code_blocks(path: Path):
    """(first line number, lines) of every fenced code block."""
    block, start, fence = None, 0, ""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if block is None and stripped.startswith("```"):
            block, start, fence = [], i + 1, stripped[:3]
        elif block is not None and stripped.startswith(fence):
            yield start, block
            block = None
        elif block is not None:
            block.append(line)


def logical_lines(start: int, lines: list[str]):
    """(line number, text) with backslash continuations joined."""
    buf, first = "", None
    for i, line in enumerate(lines, start):
        if first is None:
            first = i
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield first, buf + line
        buf, first = "", None
    if buf:
        yield first, buf


def zfdiffusion_args(text: str) -> list[list[str]] | None:
    """The arguments of each `zfdiffusion` (or `-m napari_zfdiffusion.cli`) command on a line;
    optional parts written `[--opt value]` are kept, as a user who types them would."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    commands, current = [], []
    for t in tokens + [";"]:
        if t in ("&&", "||", ";", "|"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(t)
    out = []
    for cmd in commands:
        for i, t in enumerate(cmd):
            if Path(t).name == "zfdiffusion" or (t == "napari_zfdiffusion.cli" and i > 0 and cmd[i - 1] == "-m"):
                args = [a.strip("[]") for a in cmd[i + 1:]]
                out.append([a for a in args if a])
                break
    return out


def documented_commands():
    found = []
    for path in DOCS:
        for start, lines in code_blocks(path):
            for lineno, text in logical_lines(start, lines):
                for args in zfdiffusion_args(text) or []:
                    found.append((f"{rel(path)}:{lineno}", args))
    return found


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check():
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/user-guide.md", "docs/training.md"} <= where
    assert len(COMMANDS) > 40


def parse_error(args: list[str]) -> str | None:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.build_parser().parse_args(args)
    except SystemExit as e:
        if e.code:
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def test_every_documented_command_parses():
    bad = []
    for where, args in COMMANDS:
        if "..." in args:  # an abbreviation in the docs ("dataset ..."): nothing to parse
            continue
        msg = parse_error(args)
        if msg:
            bad.append(f"{where}: zfdiffusion {shlex.join(args)}\n    {msg}")
    assert not bad, "documented commands the parser refuses:\n" + "\n".join(bad)


def test_a_wrong_command_is_caught_with_its_place(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```bash\nzfdiffusion generate --depth 2 \\\n    --resolution 100 --out a.tif\n```\n")
    (start, lines), = code_blocks(doc)
    (lineno, text), = logical_lines(start, lines)
    assert lineno == 4
    assert "invalid choice: 100" in parse_error(zfdiffusion_args(text)[0])


# ------------------------------------------------------------------ links, images, anchors
def strip_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub makes for a file's headings (duplicates get -1, -2, ...), and <a id=...>."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)  # no '# comment' headings
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path):
    text = strip_code(path.read_text())
    for m in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
        yield m.group(1)
    for m in re.finditer(r"<img[^>]+src=\"([^\"]+)\"", text):
        yield m.group(1)


def test_every_relative_link_and_image_exists():
    bad, checked = [], 0
    for path in DOCS:
        for target in links(path):
            local = REPO_RAW.match(target) or REPO_BLOB.match(target)
            if local:
                target = "/" + local.group(1)  # from the repository's root
            elif re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http(s), mailto: not checked here
                continue
            checked += 1
            name, _, anchor = target.partition("#")
            dest = path if not name else (ROOT / name.lstrip("/") if name.startswith("/") else path.parent / name)
            if not dest.exists():
                bad.append(f"{rel(path)}: {target} (no such file: {dest.resolve()})")
            elif anchor and dest.suffix == ".md" and anchor not in github_anchors(dest):
                bad.append(f"{rel(path)}: {target} (no heading or anchor '#{anchor}' in {rel(dest.resolve())})")
    assert checked > 50
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_readme_opens_with_a_screenshot_and_the_two_commands():
    text = (ROOT / "README.md").read_text()
    head = text[:text.index("## What it does")]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", head)
    assert len(images) == 1 and REPO_RAW.match(images[0])
    assert (ROOT / REPO_RAW.match(images[0]).group(1)).is_file()
    assert "make demo" in head and "make test" in head


# ------------------------------------------------------------------ the cheap commands, run
RUNNABLE = {"models", "generate", "upsample", "volume", "em", "segment"}
SHRINK = {"--resolution": "64", "--steps": "2", "--sr-steps": "2", "--n": "1", "--device": "cpu",
          "--tile": "64", "--overlap": "16"}


def shrunk(args: list[str]) -> list[str]:
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in SHRINK:
            out[i + 1] = SHRINK[a]
        if a == "--resolution" and out[0] == "upsample":
            out[i + 1] = "128"  # from 64: one super-resolution stage
        if a == "--depths":
            out[i + 1] = "0-1"
    if out[0] in ("generate", "upsample", "volume", "em", "segment"):
        out += ["--device", "cpu"] if "--device" not in out else []
        out += ["--steps", "2"] if out[0] != "segment" and "--steps" not in out else []
        out += ["--resolution", "64"] if out[0] in ("generate", "volume") and "--resolution" not in out else []
    return ["-q", *out]


@pytest.mark.slow
def test_the_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    """The README's command-line block, from top to bottom: each input a command reads was made by a
    command above it, or is the user's own image (nuclei.tif comes from `em generate` above segment)."""
    import tifffile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ran = []
    for where, args in COMMANDS:
        if not where.startswith("README.md") or "..." in args or args[0] not in RUNNABLE:
            continue
        cmd = shrunk(args)
        if args[0] == "segment":  # a small plane of the generated patches: the test's time, not the doc's
            img = tifffile.imread("nuclei.tif")
            tifffile.imwrite("nuclei.tif", img.reshape(-1, *img.shape[-2:])[0, :128, :128])
        assert cli.main(cmd) == 0, f"{where}: zfdiffusion {shlex.join(cmd)}\n{capsys.readouterr().err}"
        ran.append(args[0] if args[0] != "em" else "em generate")
    assert {"models", "generate", "upsample", "volume", "em generate", "segment"} <= set(ran)
    assert tifffile.imread("slice512.tif").shape[-1] == 128  # upsampled from the 64 px slice above
    assert tifffile.imread("labels.tif").shape == (128, 128)


@pytest.mark.slow
def test_the_training_guide_cascade_commands_run_in_order(tmp_path, monkeypatch, capsys):
    """docs/training.md's `train cascade` commands on my_stacks/, top to bottom, base and sr128 only
    (tiny networks, two steps): the slice cascade, then a volume model started from it (--init-from
    with the --loss the guide gives)."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_stacks

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    make_stacks(tmp_path / "my_stacks", n=2, z=3, shape=(144, 144))
    ran, done = [], set()
    for where, args in COMMANDS:
        if not (where.startswith("docs/training.md") and args[:2] == ["train", "cascade"]
                and "my_stacks/" in args and args[args.index("--stage") + 1] in ("base", "sr128")):
            continue
        stage = (args[args.index("--out") + 1], args[args.index("--stage") + 1])
        if stage in done:  # the same stage again, another way (under torchrun): an alternative, not a next step
            continue
        done.add(stage)
        cmd = ["-q", *args, "--size", "tiny", "--batch-size", "2", "--warmup", "1", "--device", "cpu", "--steps", "2"]
        assert cli.main(cmd) == 0, f"{where}: zfdiffusion {shlex.join(cmd)}\n{capsys.readouterr().err}"
        ran.append(where)
    assert len(ran) >= 4  # two stages of the slice cascade, two of the volume model
    assert (tmp_path / "models" / "my_volumes" / "sr128" / "stage.json").is_file()
