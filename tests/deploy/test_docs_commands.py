"""The commands the README, docs/getting-started.md and deploy/README.md show work:
make targets exist, every `hsmgw` and `hsmctl` command line parses (without running
it: some would call AWS), every repository path they name exists, the getting-started
page says what the README says, and its Python examples run against a real gateway."""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
GETTING_STARTED = ROOT / "docs" / "getting-started.md"
DEPLOY_README = ROOT / "deploy" / "README.md"
PAGES = [README, GETTING_STARTED, DEPLOY_README]
REPO_DIRS = ("deploy/", "docs/", "examples/", "protos/", "tests/", "gateway/", "router/")


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def shell_commands(path: Path) -> list[list[str]]:
    """Every simple command of the page's ```sh blocks, continuation lines joined,
    comments dropped, split at && ; and |."""
    commands = []
    for block in blocks(path, "sh"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"&&|;|\|", line):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def program(argv: list[str]) -> str:
    return Path(argv[0]).name


class _Parsed(Exception):
    pass


def parse_hsmgw(argv: list[str]) -> argparse.Namespace:
    """Run ``hsmgw``'s own argument parsing and stop before the command runs."""
    from gateway.cli import hsmgw

    original = argparse.ArgumentParser.parse_args

    def stop_after(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> argparse.Namespace:
        raise _Parsed(original(self, *args, **kwargs))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", stop_after):
        try:
            hsmgw.main(argv)
        except _Parsed as parsed:
            return parsed.args[0]  # type: ignore[no-any-return]
    raise AssertionError(f"hsmgw {argv} did not parse its arguments")


def parse_hsmctl(argv: list[str]) -> argparse.Namespace:
    from gateway.cli.hsmctl import _hoisted, build_parser

    parser = build_parser()
    return parser.parse_args(_hoisted(argv, parser))


def _help_examples() -> list[list[str]]:
    """Every `hsmctl …` example in hsmctl's own help texts."""
    import re

    from gateway.cli.hsmctl import build_parser

    texts: list[str] = []
    parsers = [build_parser()]
    while parsers:
        parser = parsers.pop()
        texts += [parser.description or "", parser.epilog or ""]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    examples = []
    for text in texts:  # an example starts a line, or follows "Example:" or "; "
        for line in re.findall(r"(?:^|Examples?: |; )\s*hsmctl ([-\w][^;\n`]*)", text, re.MULTILINE):
            first = line.split()[0]
            if first.startswith("-") or first in commands:  # not prose ("hsmctl talks to …")
                examples.append(shlex.split(line, comments=True))
    return examples


def test_hsmctl_help_examples_parse(capsys: pytest.CaptureFixture[str]) -> None:
    examples = _help_examples()
    assert len(examples) > 20, examples
    for argv in examples:
        try:
            parse_hsmctl(argv)
        except SystemExit as exc:
            pytest.fail(f"hsmctl's help shows `hsmctl {shlex.join(argv)}`, which does not parse (exit {exc.code}): "
                        f"{capsys.readouterr().err.strip()}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_make_targets_exist(page: Path) -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    used = {argv[1] for argv in shell_commands(page) if argv[0] == "make" and len(argv) > 1}
    used |= set(re.findall(r"`make (\w[\w-]*)`", page.read_text()))
    assert used <= targets, f"{page.name} uses make targets that do not exist: {used - targets}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hsmgw_and_hsmctl_command_lines_parse(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checked = 0
    for argv in shell_commands(page):
        name = program(argv)
        if name not in ("hsmgw", "hsmctl"):
            continue
        try:
            (parse_hsmgw if name == "hsmgw" else parse_hsmctl)(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"{page.name}: `{shlex.join(argv)}` does not parse (exit {exc.code}): "
                        f"{capsys.readouterr().err.strip()}")
        checked += 1
    if page != README:
        assert checked, f"{page.name} shows no hsmgw/hsmctl command"


def test_the_parse_check_would_catch_a_wrong_option() -> None:
    with pytest.raises(SystemExit):
        parse_hsmctl(["keys", "list", "--prefx", "demo/"])
    with pytest.raises(SystemExit):
        parse_hsmgw(["serve", "--config", "x.toml", "--grce", "5"])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_in_commands_and_links_exist(page: Path) -> None:
    missing = []
    for argv in shell_commands(page):
        for token in argv:
            for candidate in re.split(r"[=,]", token.removeprefix("file://")):
                if candidate.startswith(REPO_DIRS) and not (ROOT / candidate).exists():
                    missing.append(candidate)
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in link and not (page.parent / link).exists():
            missing.append(link)
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_docs_pages_link_only_to_files_that_exist() -> None:
    for page in sorted((ROOT / "docs").glob("*.md")):
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link:
                assert (page.parent / link).exists(), f"{page.name} links to missing {link}"


def test_architecture_names_modules_that_exist() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    for path in set(re.findall(r"`((?:gateway|router)/[\w/]*(?:\.py|/))`", text)):
        assert (ROOT / path).exists(), f"docs/architecture.md names {path}, which does not exist"


def test_index_links_every_doc_and_the_operations_section() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not link {page.name}"
    operations = index.split("## Operations", 1)[1]
    assert "(failover.md)" in operations and "(operations.md)" in operations


def test_readme_links_the_docs() -> None:
    text = README.read_text()
    assert "## Docs" in text
    for page in ("docs/index.md", "docs/getting-started.md", "deploy/README.md"):
        assert f"]({page})" in text


def test_getting_started_matches_the_readme() -> None:
    """The same commands and the same first example, word for word."""
    assert blocks(GETTING_STARTED, "python")[0] == blocks(README, "python")[0]
    readme_sh = [line for block in blocks(README, "sh") for line in block.splitlines()]
    guide_sh = [line for block in blocks(GETTING_STARTED, "sh") for line in block.splitlines()]
    for line in readme_sh:
        assert line in guide_sh, f"docs/getting-started.md lacks the README's `{line}`"


def test_getting_started_client_example_runs(gateway) -> None:
    """The failover client example, against a real gateway (the second endpoint is down)."""
    code = blocks(GETTING_STARTED, "python")[1]
    assert "127.0.0.1:50051" in code and "127.0.0.1:50052" in code
    code = code.replace("127.0.0.1:50051", gateway.target).replace("127.0.0.1:50052", "127.0.0.1:1")
    for _ in range(2):  # idempotent: a second run gets the same key
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "verified"


def test_readme_hsmctl_commands_run_against_a_gateway(gateway, crypto) -> None:
    """The operator commands of the README and getting-started, for real."""
    from hsmgw.v1 import crypto_pb2 as pb

    # The key the README's Python example creates (same request id: the same key).
    crypto.GenerateKey(pb.GenerateKeyRequest(request_id="demo-1", key_id="demo/signing",
                                             algorithm=pb.KEY_ALGORITHM_EC_P256), timeout=120)
    commands = [argv for argv in shell_commands(README) if program(argv) == "hsmctl"]
    assert commands
    for argv in commands:
        out = subprocess.run([sys.executable, "-m", "gateway.cli.hsmctl", "--target", gateway.target, *argv[1:]],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{shlex.join(argv)}: {out.stderr}"
        assert out.stdout.strip()


def test_getting_started_failover_walk_through_logs_what_the_page_says(gateway) -> None:
    """The page's second gateway answers, the first is stopped (its port refuses connections):
    the example logs the line the page shows, and still verifies."""
    [logged] = re.findall(r"logs `(endpoint 127\.0\.0\.1:50051 [^`]*)`", GETTING_STARTED.read_text())
    code = blocks(GETTING_STARTED, "python")[1]
    with socket.socket() as stopped:  # bound, not listening: refused, as a stopped gateway's port is
        stopped.bind(("127.0.0.1", 0))
        first = f"127.0.0.1:{stopped.getsockname()[1]}"
        code = code.replace("127.0.0.1:50051", first).replace("127.0.0.1:50052", gateway.target)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "verified"
    assert out.stderr.splitlines() == [logged.replace("127.0.0.1:50051", first)]
