"""`python -c` code that runs the llava-edge CLI with some installed packages out of sight of the path finder,
as on a machine where they were never installed (`import x` fails, importlib.util.find_spec("x") is None)."""


def cli_without(*packages: str) -> str:
    return f"""
import importlib.machinery, sys
HIDDEN = {set(packages)!r}
class Without(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] in HIDDEN else super().find_spec(name, path, target)
sys.meta_path = [Without if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
from llava_edge.cli import main
main()
"""
