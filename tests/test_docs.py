"""Every figure in README.md and docs/*.md comes from a JSON record in benchmarks/results/.

A figure is a number with a decimal point (5.621, -0.197, 1.8) in the text, outside code spans,
fenced code, HTML comments and link targets. Each one must be the text of a link, either to the
record that holds it, with the JSON path of every number of the link's text in the fragment, in
order, separated by commas:

    [5.621 ± 0.021](benchmarks/results/swissroll.json#evaluation.K_bits,evaluation.stderr_bits)

or to the publication it quotes ([3.70](https://arxiv.org/abs/2006.11239)). A path's segments are
dictionary keys, list indices, or ``key=value`` for the list element whose ``key`` is ``value``; a
path may end in ``*F`` or ``/F`` (units: ``*100`` for a percentage, ``/60`` for minutes). The
number shown must be the recorded value rounded to the decimals shown. Every number in a record
link's text is checked, integers too. Section numbers (``section 5.2``, ``Eq. 14``) are not figures.

The README's Python example is run as written.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RECORDS = ROOT / "benchmarks" / "results"

NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*\d)")
DECIMAL = re.compile(r"(?<![\w.])-?\d+\.\d+(?![\w.]*\d)")
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]*)\)")
CODE = re.compile(r"`[^`]*`")
COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
REFERENCE = re.compile(r"\b(?:sections?|sec\.|Eqs?\.|App\.|Table|Fig\.|version)\s*\d+(?:\.\d+)*")


def prose(document: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced code, HTML comments and code spans."""
    text = COMMENT.sub(lambda m: "\n" * m.group().count("\n"), document.read_text(encoding="utf-8"))
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, CODE.sub("", line)))
    return lines


def resolve(record: object, path: str) -> float:
    """The number at a dotted path of a record (see the module docstring)."""
    path, operator, factor = re.fullmatch(r"(.*?)(?:([*/])([\d.]+))?", path).groups()
    value = record
    for segment in path.split("."):
        if isinstance(value, list) and "=" in segment:
            key, wanted = segment.split("=", 1)
            [value] = [item for item in value if str(item.get(key)) == wanted]
        elif isinstance(value, list):
            value = value[int(segment)]
        else:
            value = value[segment]
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path} is {value!r}, not a number"
    if operator:
        value = value * float(factor) if operator == "*" else value / float(factor)
    return value


def shown(value: float, text: str) -> str:
    """``value`` rounded to as many decimals as ``text`` shows."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return f"{value:.{decimals}f}"


def is_citation(target: str) -> bool:
    return target.split("#")[0].endswith(".json") or target.startswith("https://")


def bare_figures(document: Path) -> list[str]:
    """Every decimal number outside a record or publication link."""
    bare = []
    for line, text in prose(document):
        outside = LINK.sub(lambda m: "" if is_citation(m.group(2)) else m.group(1), text)
        bare += [f"{document.name}:{line}: {number}" for number in DECIMAL.findall(REFERENCE.sub("", outside))]
    return bare


def wrong_figures(document: Path, records: Path = RECORDS) -> list[str]:
    """Every number of a record link's text that is not its record's value, as shown."""
    wrong = []
    for line, text in prose(document):
        for label, target in LINK.findall(text):
            if not target.split("#")[0].endswith(".json"):
                continue
            file, _, fragment = target.partition("#")
            file, where = (document.parent / file).resolve(), f"{document.name}:{line}: [{label}]"
            numbers, paths = NUMBER.findall(label), fragment.split(",") if fragment else []
            if not (file.is_relative_to(records) and file.is_file()):
                wrong.append(f"{where}: no record {file}")
            elif len(numbers) != len(paths):
                wrong.append(f"{where}: {len(numbers)} numbers but {len(paths)} JSON paths")
            else:
                record = json.loads(file.read_text(encoding="utf-8"))
                for number, path in zip(numbers, paths):
                    if (value := shown(resolve(record, path), number)) != number:
                        wrong.append(f"{where}: {number}, but {file.name}#{path} is {value}")
    return wrong


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_figure_is_a_link(document):
    """No decimal number outside a link: each figure names its record (or its publication)."""
    assert not (bare := bare_figures(document)), "figures without a record link:\n" + "\n".join(bare)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_linked_figure_equals_its_record(document):
    assert not (wrong := wrong_figures(document)), "\n".join(wrong)


def test_the_check_catches_bare_and_wrong_figures(tmp_path):
    records = tmp_path / "benchmarks" / "results"
    records.mkdir(parents=True)
    (records / "r.json").write_text('{"rows": [{"name": "a", "K": 1.2345}], "s": 0.9}')
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    page.write_text("K [1.23](../benchmarks/results/r.json#rows.name=a.K), [90%](../benchmarks/results/r.json#s*100), "
                    "section 5.2, `lr = 0.5`, [3.70](https://arxiv.org/abs/2006.11239)\n```\n0.5\n```\n")
    assert bare_figures(page) == [] and wrong_figures(page, records) == []
    page.write_text("K 1.23 (section 5.2), [see 4.5](usage.md)\n")
    assert bare_figures(page) == ["page.md:1: 1.23", "page.md:1: 4.5"]
    page.write_text("[1.24](../benchmarks/results/r.json#rows.0.K) [1.23 ± 4](../benchmarks/results/r.json#rows.0.K) "
                    "[1](../benchmarks/results/q.json#s)\n")
    assert [w.split(": ", 2)[2] for w in wrong_figures(page, records)] == [
        "1.24, but r.json#rows.0.K is 1.23", "2 numbers but 1 JSON paths", f"no record {records / 'q.json'}"]


def test_the_readme_python_example_runs():
    [example] = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.DOTALL)
    exec(compile(example, "README.md", "exec"), {})
