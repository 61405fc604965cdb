"""The simulator image's dependency list (the Dockerfile's sim stage) covers every package the simulator imports."""
import ast
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
# what the sim stage copies and installs
SOURCES = ("simulator/cxygpt_sim", "profiles/cxygpt_profiles")


def picked(stage: str) -> set[str]:
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    block = dockerfile.split(f"AS {stage}\n", 1)[1].split("\nFROM ", 1)[0]
    return set(re.search(r"pick_deps\.py ([^>]+)>", block).group(1).split())


def imported_distributions() -> set[str]:
    modules = set()
    for source in SOURCES:
        for path in (ROOT / source).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {Path(s).name for s in SOURCES}
    by_module = importlib.metadata.packages_distributions()
    return {d.lower().replace("_", "-") for m in third_party for d in by_module[m]}


def test_the_sim_stage_installs_what_the_simulator_imports():
    assert imported_distributions() - picked("sim-build") == set()
