"""The README stays in sync with the code: the two commands first, every file in the Layout, every module in the
API section, and every ``python -m capret_utils.<mod>`` / ``python benchmarks/<script>`` it mentions exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PACKAGE = ROOT / "capret_utils"


def section(title: str) -> str:
    """The text of the ``## <title>`` section, up to the next ``## `` heading (or the end)."""
    match = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_readme_starts_with_the_two_commands():
    body = README.split("\n", 1)[1].lstrip()          # skip the title line
    assert body.startswith("```"), "the first thing after the title must be the code block with the two commands"
    block = body.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands


def test_layout_names_every_package_file_notebook_and_benchmark():
    layout = section("Layout")
    wanted = [p for p in package_files() if p.name != "__init__.py"]
    wanted += sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "benchmarks").glob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in wanted if p.name not in layout]
    assert not missing, f"not in the README's Layout section: {missing}"
    packages = [p.parent for p in package_files() if p.name == "__init__.py"]
    assert layout.count("__init__.py") >= len(packages)
    for pkg in packages:
        assert f"{pkg.name}/" in layout, f"package folder {pkg.relative_to(ROOT)}/ missing from the Layout"
    for top in ("Makefile", "pyproject.toml", "environment.yml", ".ci/run", ".pre-commit-config.yaml", "runs/",
                "data/", "tests/"):
        assert top in layout, top


def test_api_section_names_every_module():
    api = section("API by module")
    missing = [module_name(p) for p in package_files()
               if module_name(p) != "capret_utils" and f"`{module_name(p)}`" not in api]
    assert not missing, f"modules missing from the README's API section: {missing}"


def test_every_python_m_command_names_a_runnable_module():
    mods = set(re.findall(r"python -m (capret_utils(?:\.\w+)+)", README))
    assert mods, "the README should show the package's command lines"
    for mod in sorted(mods):
        rel = Path(*mod.split("."))
        path = ROOT / rel.with_suffix(".py")
        if not path.is_file():
            path = ROOT / rel / "__main__.py"
        assert path.is_file(), f"README mentions `python -m {mod}` but {mod} does not exist"
        assert "__main__" in path.read_text(encoding="utf-8"), f"{mod} has no command line (__main__ guard)"


def test_every_benchmark_command_names_an_existing_script():
    scripts = set(re.findall(r"python (benchmarks/[\w.]+\.py)", README))
    assert scripts
    missing = sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not missing, f"README runs benchmark scripts that do not exist: {missing}"
