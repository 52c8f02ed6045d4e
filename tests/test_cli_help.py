"""What a newcomer reads: every command has a description, every flag a help text with its default."""
import argparse

import pytest

from amrseg.cli import build_parser, main


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _flags():
    out = []
    for name, parser in _commands().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            out.append(pytest.param(name, action, id=f"{name}:{'/'.join(action.option_strings) or action.dest}"))
    return out


@pytest.mark.parametrize("name", sorted(_commands()))
def test_every_command_has_a_description_paragraph(name, capsys):
    parser = _commands()[name]
    assert parser.description and len(parser.description.split()) >= 15, name
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert parser.description.split()[0] in capsys.readouterr().out


@pytest.mark.parametrize("name, action", _flags())
def test_every_flag_has_help_with_its_default(name, action):
    assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
    if action.required or isinstance(action, argparse._StoreTrueAction):
        return
    if not action.option_strings and action.nargs is None:  # a required positional
        return
    formatter = _commands()[name].formatter_class("amrseg")  # the formatter `amrseg NAME --help` uses
    shown = formatter._get_help_string(action) % {"default": action.default}
    assert "default" in shown.lower(), f"{name} {action.option_strings}: help does not show the default: {shown}"


def test_readme_and_docs_link_only_to_files_in_the_repository():
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    for doc in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not in the repository"
        # the specs outside the repository are not cited by name
        for outside in ("AMR.md", "CONTRACT.md", "STYLE.md"):
            assert outside not in text, f"{doc.name} cites {outside}, which is not in the repository"
    assert (repo / "LICENSE").read_text().startswith("MIT License")
