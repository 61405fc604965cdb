"""The console image's dependency list (the Dockerfile's console stage) covers every package the console imports,
and its package data carries every asset the pages load (no CDN at run time)."""
import ast
import importlib.metadata
import re
import sys
import tomllib

from test_sim_image import ROOT, picked

SOURCE = ROOT / "console" / "cxygpt_console"


def imported_distributions() -> set[str]:
    modules = set()
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    by_module = importlib.metadata.packages_distributions()
    return {d.lower().replace("_", "-") for m in modules - set(sys.stdlib_module_names) - {"cxygpt_console"}
            for d in by_module[m]}


def with_requirements(names: set[str]) -> set[str]:
    """The distributions and, transitively, what they require (as installed here)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # required only on other Pythons (a marker)
            continue
        for requirement in requirements:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-"))
    return seen


def test_the_console_stage_installs_what_the_console_imports():
    stage = picked("console-build")
    assert imported_distributions() - with_requirements(stage) == set()
    assert {"jinja2", "itsdangerous"} <= stage  # Starlette's templates and sessions import them only when used


def test_every_asset_a_page_loads_is_package_data():
    patterns = tomllib.load(open(ROOT / "pyproject.toml", "rb"))["tool"]["setuptools"]["package-data"]["cxygpt_console"]
    shipped = {p.relative_to(SOURCE).as_posix() for pattern in patterns for p in SOURCE.glob(pattern)}
    loaded = set()
    for template in (SOURCE / "templates").glob("*.html"):
        text = template.read_text()
        assert "http://" not in text and "https://" not in text, f"{template.name} loads something from elsewhere"
        loaded |= {f"static/{path}" for path in re.findall(r'"/static/([^"?]+)', text)}
    assert loaded and loaded <= shipped, loaded - shipped
    assert {"static/vendor/uplot/LICENSE", "static/vendor/uplot/VERSION"} <= shipped
    assert {f"templates/{t.name}" for t in (SOURCE / "templates").glob("*.html")} <= shipped
