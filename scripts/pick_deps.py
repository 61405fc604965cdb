"""Prints the named dependencies of pyproject.toml with their pins (for one image's requirements)."""
import re
import sys
import tomllib


def name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
wanted = set(sys.argv[1:])
picked = [d for d in deps if name(d) in wanted]
missing = wanted - {name(d) for d in picked}
if missing:
    sys.exit(f"not in pyproject.toml's dependencies: {', '.join(sorted(missing))}")
print("\n".join(picked))
