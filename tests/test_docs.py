"""The documentation: the site builds strictly (a broken link, a missing anchor, a page missing
from the navigation or a navigation entry without its page fails), the configuration reference
is the one the schema generates, and the paths the documents name exist. All in this process
(unit tier): MkDocs is called as a library, not as a program."""

import dataclasses
import logging
import re
import shutil
import types
from pathlib import Path

import pytest

from megatron_gift.config import reference, schema

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIG_MD = DOCS / "reference" / "config.md"


@pytest.fixture
def mkdocs_logging():
    """MkDocs counts the warnings of its ``mkdocs`` logger to abort a strict build: make sure
    nothing earlier in this process has silenced them."""
    logger = logging.getLogger("mkdocs")
    level, disabled = logger.level, logging.root.manager.disable
    logger.setLevel(logging.INFO)
    logging.disable(logging.NOTSET)
    yield
    logger.setLevel(level)
    logging.disable(disabled)


def build_site(config_file: Path, site_dir: Path) -> None:
    """``mkdocs build --strict`` of ``config_file`` into ``site_dir``, in this process."""
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(config_file=str(config_file), strict=True, site_dir=str(site_dir))
    build(config)


def test_the_docs_build_strictly(tmp_path, mkdocs_logging):
    build_site(ROOT / "mkdocs.yml", tmp_path / "site")
    for page in ("index.html", "getting-started/index.html", "save-directory/index.html",
                 "reference/config/index.html", "results/index.html",
                 "results/reproduction/report/index.html", "results/reproduction/primary.png"):
        assert (tmp_path / "site" / page).is_file(), page


def _docs_copy(tmp_path: Path) -> Path:
    """A copy of mkdocs.yml and docs/ to plant defects in; results/ is the real one."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs", symlinks=True)  # docs/results -> ../results
    (tmp_path / "results").symlink_to(ROOT / "results", target_is_directory=True)
    return tmp_path / "docs"


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text(encoding="utf-8") + text, encoding="utf-8")


# defect -> (how to plant it in a copy of docs/, what the build's warning names)
PLANTED = {
    "a link to a missing page": (
        lambda docs: _append(docs / "index.md", "\n[gone](no-such-page.md)\n"), "no-such-page.md"),
    "a link to a missing heading": (
        lambda docs: _append(docs / "index.md", "\n[gone](getting-started.md#no-such-heading)\n"),
        "no-such-heading"),
    "a link to a file outside docs/": (
        lambda docs: _append(docs / "training" / "index.md",
                             "\n[recipe](../../examples/recipes/tiny_cpu.yaml)\n"),
        "tiny_cpu.yaml"),
    "a page the navigation names is missing": (lambda docs: (docs / "cpu.md").unlink(), "cpu.md"),
    "a page missing from the navigation": (
        lambda docs: (docs / "orphan.md").write_text("# Orphan\n"), "orphan.md"),
}


@pytest.mark.parametrize("defect", PLANTED)
def test_a_planted_defect_fails_the_strict_build(tmp_path, mkdocs_logging, caplog, defect):
    from mkdocs.exceptions import Abort

    plant, named = PLANTED[defect]
    plant(_docs_copy(tmp_path))  # the copy as it is builds: test_the_docs_build_strictly
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        with pytest.raises(Abort, match="strict mode"):
            build_site(tmp_path / "mkdocs.yml", tmp_path / "site")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all(named in w for w in warnings), warnings  # that defect alone


def test_the_config_reference_is_the_one_the_schema_generates():
    committed = CONFIG_MD.read_text(encoding="utf-8") if CONFIG_MD.is_file() else ""
    generated = reference.config_reference()
    if committed != generated:
        old, new = committed.splitlines(), generated.splitlines()
        first = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/reference/config.md is out of date with megatron_gift/config/schema.py "
                    f"(first difference at line {first + 1}): regenerate it with "
                    f"`{reference.REGENERATE}`")


def test_the_config_reference_names_every_key_with_its_flag_default_and_choices():
    text = reference.config_reference()
    for section in schema.SECTIONS:
        assert f"\n## {section}\n" in text
        for f in schema.section_fields(section):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{f.name}` |"))
            assert f"`{schema.flag_name(section, f.name)}`" in row
            for choice in f.metadata.get("choices") or ():
                assert f"`{choice}`" in row
    assert "| `gift.beta` | `--gift-beta` | float | `20.0` |" in text
    assert "| `training.bf16` | `--bf16`, `--no-bf16` | bool | `false` |" in text
    assert "| `data.text_field` | `--text-field` | str or none | `none` |" in text


def _planted_help(monkeypatch, section: str, key: str, help_text: str) -> None:
    """Change the help of ``section.key`` in the schema for this test only."""
    field = schema.JobConfig.__dataclass_fields__[section].default_factory.__dataclass_fields__[key]
    metadata = dict(field.metadata, help=help_text)
    monkeypatch.setattr(field, "metadata", types.MappingProxyType(metadata))


def test_a_changed_help_string_makes_the_committed_reference_stale(monkeypatch, capsys):
    _planted_help(monkeypatch, "gift", "beta", "a planted help string")
    generated = reference.config_reference()
    assert "a planted help string" in generated
    assert generated != CONFIG_MD.read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        reference.main(["--check", str(CONFIG_MD)])
    assert exit_info.value.code == 1
    assert reference.REGENERATE in capsys.readouterr().err


def test_a_new_schema_key_appears_in_the_reference(monkeypatch):
    new = dataclasses.field(default=None, metadata={"help": "a planted key", "choices": None,
                                                    "flag": None})
    new.name, new.type = "planted_key", str
    fields, flag_name = schema.section_fields, schema.flag_name
    monkeypatch.setattr(schema, "section_fields",
                        lambda s: fields(s) + ((new,) if s == "logging" else ()))
    monkeypatch.setattr(schema, "flag_name", lambda s, k: "--planted-key" if k == new.name
                        else flag_name(s, k))
    text = reference.config_reference()
    assert "| `logging.planted_key` | `--planted-key` | str | `none` |  | a planted key |" in text


def test_reference_write_and_check(tmp_path, capsys):
    target = tmp_path / "config.md"
    reference.main(["--write", str(target)])
    assert target.read_text(encoding="utf-8") == reference.config_reference()
    reference.main(["--check", str(target)])  # up to date: returns
    reference.main([])
    assert capsys.readouterr().out == reference.config_reference()


def test_markdown_in_help_text_is_escaped():
    assert reference._escape("a|b *c* [d] <e> f_g `h`") == r"a\|b \*c\* \[d\] \<e> f\_g \`h\`"


# Paths the documents name as code (`megatron_gift/...`, `examples/...`) must exist: they are
# not links, so the strict build does not see them.
_CODE_PATH = re.compile(r"`((?:megatron_gift|examples|tests|docs|results|patches)/[\w./-]*)")
# Paths of other projects (NeMo RL, NeMo-Aligner) and of this one's past, named as such.
_ELSEWHERE = {"examples/run_grpo.py", "examples/nlp/gpt/conf/gpt_reinforce_actor.yaml",
              "docs/user-guide/reinforce.rst", "tests/oracle.py"}
_DOCUMENTS = [ROOT / "README.md", ROOT / "tests" / "README.md", ROOT / "patches" / "README.md",
              *sorted(DOCS.rglob("*.md")), *sorted((ROOT / "results").glob("*.md"))]


def test_every_path_the_documents_name_exists():
    missing = []
    for document in _DOCUMENTS:
        if "work" in document.relative_to(ROOT).parts:
            continue
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            for path in _CODE_PATH.findall(line):
                path = path.rstrip(".")
                if "/work/" in path or path in _ELSEWHERE:
                    continue  # make reproduce's ignored checkpoints; other projects' files
                if not (ROOT / path).exists():
                    missing.append(f"{document.relative_to(ROOT)}:{number}: {path}")
    assert not missing, "paths named in the documents that do not exist:\n" + "\n".join(missing)


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_the_readme_links_resolve():
    """The README is read on its own (not part of the site): its relative links must resolve."""
    broken = []
    for target in _LINK.findall((ROOT / "README.md").read_text(encoding="utf-8")):
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#")[0]
        if path and not (ROOT / path).exists():
            broken.append(target)
    assert not broken, f"README.md links to missing files: {broken}"


def test_the_readme_starts_with_the_set_up_commands():
    """``.ci/run`` calls ``make test``; the README opens with the two commands a fresh machine
    needs: the main job, then the tests."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert block[0].startswith("make run ") and block[1].startswith("make test ")
    assert text.index("```bash") < text.index("\n## ")
