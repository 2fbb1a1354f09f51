"""`python -m bench [options]`: the same as `llava-edge bench`, run from a checkout (reports in bench/reports)."""

from llava_edge.cli import app

if __name__ == "__main__":
    import sys

    app(["bench", *sys.argv[1:]], prog_name="python -m bench")
