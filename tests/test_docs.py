"""The documentation runs: every Python block of README.md and docs/*.md, and the ``>>>``
examples in prunefx's docstrings, are executed and the output they show is checked.

The convention for pages (README.md, "Documentation", says it for writers):

- Every fenced block has a label. ```` ```python ```` runs. An ```` ```output ```` block right
  after it (only blank lines between) is what the Python block prints, compared as doctest
  compares (ELLIPSIS: ``...`` matches anything; NORMALIZE_WHITESPACE: runs of whitespace
  compare equal). A Python block without an output block must print nothing.
- A ```` ```python ```` or ```` ```pycon ```` block whose first line starts with ``>>>`` is a
  doctest, run by ``doctest`` with the same two flags.
- Blocks that are not meant to run say so: ```` ```python norun ```` (pseudo-code, or code
  that needs what a page cannot give: a GPU, a process group, a data set), ```` ```sh ````,
  ```` ```console ````, ```` ```text ```` (signatures, diagrams, file trees). A fence without a
  label, or with another one, and an output block that follows no Python block, fail
  ``test_every_block_is_labelled``: nothing is skipped silently.
- The blocks of one page share one namespace and run in order, in one fresh temporary working
  directory (files a page writes land there), after ``torch.manual_seed(0)``. A block is
  compiled at its own lines of the page, so tracebacks, and the source lines prunefx quotes,
  point into the page (``docs/api.md:597``).

One test per block, named after its page and the line of its opening fence
(``docs/api.md:120``). A block runs the blocks before it first, so any one of them can be run
alone (``pytest tests/test_docs.py -k "api.md:120"``); a page's blocks stay on one xdist
worker (``xdist_group``). Docstring examples run in their module's namespace plus ``torch``
and ``prunefx``; the few that are fragments are listed in ``DOCSTRINGS_NOT_RUN`` with why.
"""

from __future__ import annotations

import contextlib
import doctest
import gc
import importlib
import io
import linecache
import pkgutil
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
RUN = {"python", "pycon"}
NOT_RUN = {"python norun", "sh", "console", "text"}
OUTPUT = "output"
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    label: str
    code: str
    output: str | None = None  # the ```output block that follows, if any

    @property
    def id(self) -> str:
        return f"{_rel(self.path)}:{self.line}"

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fences(path: Path) -> list[tuple[int, str, str]]:
    """(line of the opening fence, label, body) of every fenced block of a Markdown file."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, marker, label = m.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(marker) and lines[i].strip().strip(marker[0]) == ""):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        out.append((start + 1, label, "\n".join(body) + "\n"))
        i += 1
    return out


def blocks(path: Path) -> list[Block]:
    """The blocks of ``path`` that run, each with the output block that follows it."""
    text = path.read_text().splitlines()
    found: list[Block] = []
    previous_end = -1  # line index after the last closed runnable block
    for line, label, body in fences(path):
        if label == OUTPUT:
            between = text[previous_end:line - 1] if found else ["x"]
            if found and found[-1].output is None and all(not s.strip() for s in between):
                found[-1] = Block(path, found[-1].line, found[-1].label, found[-1].code, body)
            continue  # a misplaced output block is reported by test_every_block_is_labelled
        if label in RUN:
            found.append(Block(path, line, label, body))
            previous_end = line + body.count("\n") + 1  # index of the line after the closing fence
    return found


ALL_BLOCKS = [b for p in DOC_FILES for b in blocks(p)]


# ----------------------------------------------------------------------------- running


@dataclass
class Session:
    """One file's namespace and how far its blocks have run."""

    cwd: str
    namespace: dict = field(default_factory=dict)
    done: int = 0  # blocks of the file run so far
    failed: str | None = None  # id of the first block that failed


_SESSIONS: dict[Path, Session] = {}
_FAILURES = (Exception, pytest.fail.Exception)  # pytest.fail raises a BaseException


def _session(path: Path, tmp_root: Path) -> Session:
    if path not in _SESSIONS:
        cwd = tempfile.mkdtemp(prefix=path.stem + "-", dir=tmp_root)
        _SESSIONS[path] = Session(cwd, {"__name__": "__main__"})
    return _SESSIONS[path]


def _run_python(block: Block, namespace: dict) -> str:
    """Execute a plain block; returns what it printed."""
    out = io.StringIO()
    # compiled at the block's own lines of the Markdown file: tracebacks and the source lines
    # prunefx quotes in its messages point into the page
    name = _rel(block.path)
    linecache.cache[name] = (0, None, block.path.read_text().splitlines(True), name)  # no mtime: kept
    code = compile("\n" * block.line + block.code, name, "exec")
    with contextlib.redirect_stdout(out):
        exec(code, namespace)
    return out.getvalue()


def _check_output(block: Block, got: str) -> None:
    want = block.output or ""
    if not block.output and got.strip():
        pytest.fail(f"{block.id} prints output the page does not show; add an ```output block after it:\n{got}")
    checker = doctest.OutputChecker()
    if not checker.check_output(want, got, FLAGS):
        example = doctest.Example(source=block.code, want=want)
        diff = checker.output_difference(example, got, FLAGS | doctest.REPORT_UDIFF)
        pytest.fail(f"{block.id}: the output shown differs from what the block prints.\n{diff}")


def _run_doctest(block: Block, namespace: dict) -> None:
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.id, str(block.path), block.line)
    runner = doctest.DocTestRunner(optionflags=FLAGS | doctest.REPORT_UDIFF)
    out = io.StringIO()
    result = runner.run(test, out=out.write, clear_globs=False)
    if result.failed:
        pytest.fail(f"{block.id}: doctest failed\n{out.getvalue()}")


def _run(block: Block) -> None:
    session = _SESSIONS[block.path]
    if block.doctest:
        _run_doctest(block, session.namespace)
    else:
        _check_output(block, _run_python(block, session.namespace))


@pytest.fixture(scope="session")
def _docs_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


@pytest.fixture(autouse=True)
def _release_cycles():
    """Overrides conftest's collection after every test (about 2 s each in a process that has
    imported transformers and torchvision): a page's namespace lives until its last block,
    then it is dropped and collected once (test_doc_block)."""
    yield


@pytest.mark.parametrize(
    "block", [pytest.param(b, id=b.id, marks=pytest.mark.xdist_group(f"docs:{b.path.name}")) for b in ALL_BLOCKS]
)
def test_doc_block(block: Block, _docs_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = [b for b in ALL_BLOCKS if b.path == block.path]
    index = mine.index(block)
    session = _session(block.path, _docs_tmp)
    if session.done > index:  # run again in the same process: start the page over
        del _SESSIONS[block.path]
        session = _session(block.path, _docs_tmp)
    monkeypatch.chdir(session.cwd)
    if session.done == 0:
        torch.manual_seed(0)
    for earlier in mine[session.done:index]:  # run alone: the blocks it builds on first
        with contextlib.suppress(*_FAILURES):
            _run(earlier)  # its own test reports its failure
        session.done += 1
    session.done = index + 1
    try:
        _run(block)
    except _FAILURES as exc:
        if session.failed is None:
            session.failed = block.id
            raise
        raise AssertionError(f"{block.id} failed after {session.failed} had failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if index == len(mine) - 1:  # the page is done: free its models
            _SESSIONS.pop(block.path, None)
            gc.collect()


def test_a_pages_blocks_share_a_worker(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` (``make test``) xdist tags each block's node id with its
    page's group; without the tag the blocks of a page spread over the workers and each
    worker replays the page from its start (pytest 9.2 with pytest-xdist 3.8 did)."""
    if getattr(request.config.option, "loadgroup", False):
        blocks = [item for item in request.session.items if item.name.startswith("test_doc_block[")]
        untagged = [b.nodeid for b in blocks if not b.nodeid.endswith("@" + b.get_closest_marker("xdist_group").args[0])]
        assert not untagged, f"{len(untagged)} blocks not tagged with their page's group, e.g. {untagged[:2]}"


def test_every_block_is_labelled() -> None:
    """Every fence says whether it runs; every output block follows a Python block."""
    problems = []
    for path in DOC_FILES:
        attached = sum(b.output is not None for b in blocks(path))
        outputs = 0
        for line, label, _body in fences(path):
            if label == OUTPUT:
                outputs += 1
            elif label not in RUN | NOT_RUN:
                problems.append(f"{path.relative_to(ROOT)}:{line}: fence labelled {label!r}; "
                                f"use one of {sorted(RUN | NOT_RUN | {OUTPUT})}")
        if outputs != attached:
            problems.append(f"{path.relative_to(ROOT)}: {outputs - attached} ```output block(s) do not directly "
                            "follow a ```python block")
    assert not problems, "\n".join(problems)


_CITED = re.compile(r"((?:prunefx|passes|tests|examples|benchmarks|docs)/[\w/.-]*\.(?:py|md|json|png))(?:::(\w+))?")


def test_files_and_tests_the_pages_cite_exist() -> None:
    """`prunefx/masks/cost.py`, `tests/test_modes.py::test_compile_of_a_reconfigured_model`:
    a page that cites a file or a test names one that exists."""
    missing = []
    for path in DOC_FILES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for m in _CITED.finditer(line):
                cited, test = m.groups()
                file = next((f for f in (ROOT / cited, path.parent / cited) if f.exists()), None)
                if file is None or (test and not re.search(rf"def {test}\b", file.read_text())):
                    missing.append(f"{path.relative_to(ROOT)}:{number}: {m.group(0)}")
    assert not missing, "\n".join(missing)


_SIGNATURE = re.compile(r"^(prunefx(?:\.\w+)+)\(")


def _signatures(path: Path) -> list[tuple[int, str, str]]:
    """(line, dotted name, parameter list) of each ``prunefx.name(params) -> result`` line (and
    its continuation lines) in the ```text blocks of a page."""
    found = []
    for line, label, body in fences(path):
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            m = _SIGNATURE.match(lines[i])
            if not m:
                i += 1
                continue
            text, j = lines[i], i
            while text.count("(") > text.count(")") and j + 1 < len(lines):
                j += 1
                text += " " + lines[j].strip()
            depth, end = 1, m.end()
            while end < len(text) and depth:  # the parenthesis that closes the parameter list
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            params = text[m.end():end - 1]
            if label == "text" and "..." not in params:
                found.append((line + 1 + i, m.group(1), params))
            i = j + 1
    return found


def _resolve(dotted: str):
    import prunefx

    obj = prunefx
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_signatures_shown_are_the_real_ones() -> None:
    """A signature a page shows (``prunefx.trace(model, example_inputs=None, *, ...)``) has the
    function's parameters, in order, of the same kind, with the same literal defaults."""
    import ast
    import inspect

    wrong = []
    for path in DOC_FILES:
        for line, name, params in _signatures(path):
            shown = ast.parse(f"def f({params}): pass").body[0].args  # type: ignore[attr-defined]
            real = inspect.signature(_resolve(name)).parameters
            pos = [*shown.posonlyargs, *shown.args]
            names = [a.arg for a in pos] + ([f"*{shown.vararg.arg}"] if shown.vararg else []) + \
                    [a.arg for a in shown.kwonlyargs] + ([f"**{shown.kwarg.arg}"] if shown.kwarg else [])
            actual = [("*" if p.kind is p.VAR_POSITIONAL else "**" if p.kind is p.VAR_KEYWORD else "") + n
                      for n, p in real.items()]
            defaults = dict(zip([a.arg for a in pos][len(pos) - len(shown.defaults):], shown.defaults, strict=True))
            defaults.update({a.arg: d for a, d in zip(shown.kwonlyargs, shown.kw_defaults, strict=True) if d is not None})
            problems = [] if names == actual else [f"parameters {names}, the function has {actual}"]
            for arg, node in defaults.items():
                with contextlib.suppress(ValueError):
                    value = ast.literal_eval(node)
                    if arg in real and real[arg].default != value:
                        problems.append(f"{arg}={value!r}, the default is {real[arg].default!r}")
            kw_only = {a.arg for a in shown.kwonlyargs}
            problems += [f"{n} is shown keyword-only" for n in kw_only if n in real and real[n].kind is not real[n].KEYWORD_ONLY]
            wrong += [f"{path.relative_to(ROOT)}:{line}: {name}: {p}" for p in problems]
    assert not wrong, "\n".join(wrong)


_COMMAND = re.compile(r"(`?)prunefx (prune|export|inspect)\b")


def test_command_lines_shown_use_real_flags() -> None:
    """Every ``prunefx prune|export|inspect ...`` a page shows (in a block or in backticks) uses
    flags, and --criterion / --exporter values, that the command line accepts."""
    import argparse

    from prunefx.__main__ import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    wrong = []
    for path in DOC_FILES:
        text = path.read_text()
        for m in _COMMAND.finditer(text):
            rest = text[m.end():]
            rest = rest[:rest.index("`")] if "`" in rest else rest
            if not m.group(1):  # a command line in a block: it ends at a line without a trailing backslash
                rest = re.split(r"(?<!\\)\n", rest, maxsplit=1)[0]
            parser = commands[m.group(2)]
            options = {o: a for a in parser._actions for o in a.option_strings}
            where = f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
            words = rest.split()
            for i, word in enumerate(words):
                flag = word.strip("[].,;:()")
                if not flag.startswith("-") or flag in ("-", "--"):
                    continue
                action = options.get(flag)
                if action is None:
                    wrong.append(f"{where}: prunefx {m.group(2)} has no option {flag}")
                elif action.choices and i + 1 < len(words) and words[i + 1].strip("[].,;:()") not in action.choices \
                        and words[i + 1].isidentifier():
                    wrong.append(f"{where}: {flag} {words[i + 1]} is not one of {sorted(action.choices)}")
    assert not wrong, "\n".join(wrong)


def test_the_runner_itself(tmp_path: Path) -> None:
    """The conventions on a page made up for the purpose: outputs attach, doctests run, a
    wrong output and a stray print fail, a misplaced output block is not attached."""
    page = tmp_path / "page.md"
    page.write_text(
        "```python\nx = 6 * 7\nprint(x, [x] * 20)\n```\n\n```output\n42 [42, 42, ...]\n```\n"
        "```pycon\n>>> x + 1\n43\n```\n"
        "```python\nprint('stray')\n```\n"
        "```python\nprint(x)\n```\n```output\n41\n```\n"
        "```text\nnot run\n```\n```output\norphan\n```\n"
    )
    first, doc, stray, wrong = blocks(page)
    assert first.output == "42 [42, 42, ...]\n" and doc.doctest and stray.output is None
    namespace: dict = {}
    _check_output(first, _run_python(first, namespace))
    _run_doctest(doc, namespace)
    for block in (stray, wrong):
        with pytest.raises(pytest.fail.Exception):
            _check_output(block, _run_python(block, namespace))
    with pytest.raises(pytest.fail.Exception):
        _run_doctest(Block(page, 1, "pycon", ">>> x\n41\n"), namespace)
    assert [label for _, label, _ in fences(page)].count("output") == 3


def test_docs_have_blocks() -> None:
    assert len(ALL_BLOCKS) > 40, [b.id for b in ALL_BLOCKS]


# ----------------------------------------------------------------------------- docstrings

# Docstring examples that are fragments of a larger program (they use a `model`, a process
# group, a training loop the docstring does not build), or that do not run as written in a
# module docs do not own. Each is listed with why; everything else runs.
DOCSTRINGS_NOT_RUN = {
    "prunefx.distributed": "a fragment: needs a DistributedDataParallel model and a process group "
                           "(docs/api.md runs the same on one gloo rank)",
    "prunefx.masks": "a fragment: `model` and `x` come from the reader (docs/masks.md runs the same)",
    "prunefx.masks.cost": "a fragment: `graph` comes from the reader",
    "prunefx.train.branches": "a fragment: `model`, `graph`, `keep` come from the reader",
    "prunefx.train.lasso": "a fragment of a training loop",
    "prunefx.train.shrink": "a fragment: `model`, `x`, `opt` come from the reader",
}


def _docstring_tests() -> list[doctest.DocTest | str]:
    """Every docstring with ``>>>`` examples in prunefx (a module that cannot be imported is
    returned as its name, and fails its test)."""
    import prunefx

    finder = doctest.DocTestFinder(exclude_empty=True)
    found: list[doctest.DocTest | str] = []
    for info in pkgutil.walk_packages(prunefx.__path__, "prunefx.", onerror=found.append):  # a package that fails
        try:
            module = importlib.import_module(info.name)
        except Exception:  # reported by its test, not at collection
            found.append(info.name)
            continue
        for test in finder.find(module):
            if test.examples and test.filename and Path(test.filename).is_relative_to(ROOT):
                found.append(test)
    unique = {t if isinstance(t, str) else id(t): t for t in found}.values()  # a failing package is named twice
    return sorted(unique, key=lambda t: t if isinstance(t, str) else t.name)


DOCSTRING_TESTS = _docstring_tests()


def _docstring_id(test: doctest.DocTest | str) -> str:
    if isinstance(test, str):
        return test
    return f"{Path(test.filename).relative_to(ROOT)}:{(test.lineno or 0) + 1}"


@pytest.mark.parametrize(
    "test",
    [pytest.param(t, id=_docstring_id(t)) for t in DOCSTRING_TESTS
     if isinstance(t, str) or t.name not in DOCSTRINGS_NOT_RUN],
)
def test_docstring_example(test: doctest.DocTest | str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's namespace plus ``torch`` and ``prunefx``, in a temporary directory."""
    if isinstance(test, str):
        try:
            importlib.import_module(test)
        except ModuleNotFoundError as exc:  # an optional dependency (lightning, timm): said, not hidden
            if exc.name and not exc.name.startswith("prunefx"):
                pytest.skip(f"{test} needs {exc.name}, which is not installed")
            raise
        raise AssertionError(f"{test} imports now; run the docs test again")
    import prunefx

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    test.globs = {**test.globs, "torch": torch, "prunefx": prunefx}
    runner = doctest.DocTestRunner(optionflags=FLAGS | doctest.REPORT_UDIFF)
    out = io.StringIO()
    if runner.run(test, out=out.write).failed:
        pytest.fail(f"{test.name}: docstring example failed\n{out.getvalue()}")


def test_docstrings_not_run_are_listed_with_a_reason() -> None:
    names = {t.name for t in DOCSTRING_TESTS if not isinstance(t, str)}
    stale = sorted(set(DOCSTRINGS_NOT_RUN) - names)
    assert not stale, f"DOCSTRINGS_NOT_RUN names docstrings without examples (remove them): {stale}"
    assert len(names) - len(DOCSTRINGS_NOT_RUN) >= 10
